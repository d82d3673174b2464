"""course_utils: the helper package of the mechanistic-interpretability course.

Four folders, by what the code is:
- ``science/``    what the learner studies: toy models, SAEs, transcoders, interventions,
                  attribution graphs, bilinear layers, polytopes, and the offline course model
                  they run on (see ``science/__init__.py`` for one line per module)
- ``checks/``     the exercise checks: ``core`` is the framework, ``chNN`` one module per chapter
- ``machinery/``  the course around it: environment and set-up, the chapter table, the
                  solution -> exercise build, ``course check``, the ``course`` command, Colab, widgets
- ``assets/``     shipped files (corpus, model, dictionaries); ``python -m course_utils.assets``
"""

import os

from course_utils.machinery.env import (
    block_network,
    env_report,
    set_seed,
    setup_notebook,
    text_progress_bars,
)

if os.environ.get("COURSE_BLOCK_NETWORK") == "1":
    block_network()  # `make test` sets this: a notebook that reaches for the internet fails loudly
if os.environ.get("COURSE_HEADLESS") == "1":
    text_progress_bars()  # saved notebooks show each bar's final state, not a frozen first frame

__version__ = "0.2.0"
__all__ = ["env_report", "set_seed", "setup_notebook", "__version__"]
