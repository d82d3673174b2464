"""course_utils: the helper package of the mechanistic-interpretability course.

Where things live (one module per idea):
- ``env``        seeds, device, offline status, the one-line environment report, notebook set-up
- ``chapters``   the chapter table (titles, times, budgets) and where each notebook lives
- ``checks/``    the exercise checks: ``core`` is the framework, ``chNN`` one module per chapter
- ``hooks``      hook-name validation shared by every chapter that splices into a model
- ``models``     load_model("course-2l" | "gelu-1l" | "gpt2-small"), load_sae, a tiny random model
- ``corpus``, ``course_model``, ``activations``  the offline course model: stdlib corpus, tokenizer,
                 training/evaluation, and the activation store chapters 03-05 train on
- ``assets/``    the shipped model (and dictionaries); ``python -m course_utils.assets build``
- ``toy_models``, ``plots_superposition``  chapter 01's toy models and figures
- ``saes``, ``sae_metrics``, ``sparse_data``  chapter 02's SAEs, metrics and ground-truth data
- ``lm_saes``, ``saelens_io``  chapter 03: SAEs on the course model (training, splicing, CE loss
                 recovered, feature analysis) and export to / import from the SAELens format
- ``e2e_saes``   chapter 04: end-to-end SAEs (splice, KL, the three losses, one training loop,
                 downstream evaluation, geometry) and the ``build-e2e`` sweep
- ``transcoders``, ``circuits``  chapter 05: transcoders, paired activations, splicing, the
                 transcoder-vs-SAE sweep, SAELens export; exact feature-circuit decompositions,
                 greedy path search and path graphs
- ``interventions``  chapter 06: exact feature edits through a spliced dictionary (error kept),
                 ablation effects, steering, attribution patching / integrated gradients against
                 true ablations, feature circuits (faithfulness), chapter 05's graph tested by
                 ablation; ``hooks_left`` proves no hook stays behind
- ``clt``, ``attribution_graphs``  chapter 07: cross-layer transcoders (JumpReLU, tanh penalty,
                 training, replacement-model evaluation, files, the ``build-clt`` sweep); the local
                 replacement model, attribution graphs, influence, pruning, scores, interventions,
                 circuit-tracer-style JSON and a plotly graph view
- ``bilinear``   chapter 08: bilinear layers as tensors, interaction matrices and their eigenvectors,
                 digit classifiers (bilinear / ReLU / GELU) on scikit-learn's bundled 8x8 digits
- ``polytopes``  chapter 09: polytope and spline codes of ReLU MLPs, local affine maps, region maps
                 of 2-D nets, boundary crossings along paths (sampled and exact), cluster purity
- ``widgets``    sliders that degrade to a static figure when no front end is attached
- ``build``      solution notebook -> exercise notebook
- ``grading``    ``course check``: run a learner's notebook and tabulate its exercises
- ``cli``        the ``course`` command
"""

import os

from course_utils.env import (
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
