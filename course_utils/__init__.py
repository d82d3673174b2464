"""course_utils: the helper package of the mechanistic-interpretability course.

Where things live (one module per idea):
- ``env``        seeds, device, offline status, the one-line environment report, notebook set-up
- ``chapters``   the chapter table (titles, times, budgets) and where each notebook lives
- ``checks/``    the exercise checks: ``core`` is the framework, ``chNN`` one module per chapter
- ``hooks``      hook-name validation shared by every chapter that splices into a model
- ``widgets``    sliders that degrade to a static figure when no front end is attached
- ``build``      solution notebook -> exercise notebook
- ``grading``    ``course check``: run a learner's notebook and tabulate its exercises
- ``cli``        the ``course`` command
"""

import os

from course_utils.env import block_network, env_report, set_seed, setup_notebook

if os.environ.get("COURSE_BLOCK_NETWORK") == "1":
    block_network()  # `make test` sets this: a notebook that reaches for the internet fails loudly

__version__ = "0.1.0"
__all__ = ["env_report", "set_seed", "setup_notebook", "__version__"]
