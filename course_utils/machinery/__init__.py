"""The course machinery: what runs the course around the science.

- ``env``       seeds, device, offline status, the one-line environment report, notebook set-up
- ``chapters``  the chapter table (titles, times, budgets) and where each notebook lives
- ``build``     solution notebook -> exercise notebook (and the generated Colab badge/setup cell)
- ``grading``   ``course check``: run a learner's notebook and tabulate its exercises
- ``claims``    replication records and the table they make (``course claims``, docs/replications.md)
- ``report``    ``course report``: grade a cohort's folder of notebooks into one CSV and HTML table
- ``hub``       nbgitpuller and Binder links for a shared hub (``course hub-link``)
- ``cli``       the ``course`` command
- ``colab``     installing on Colab without moving its own packages
- ``widgets``   sliders that degrade to a static figure when no front end is attached
"""
