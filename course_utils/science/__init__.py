"""The science: everything a learner builds, studies or runs an experiment on.

- ``basics``      small tensor utilities (cosine-similarity matrices)
- ``hooks``       hook-name validation shared by every chapter that splices into a model
- ``models``      load_model("course-2l" | "gelu-1l" | "gpt2-small"), load_sae, a tiny random model
- ``corpus``, ``course_model``, ``activations``  the offline course model: the shipped stdlib
                  corpus, tokenizer, training/evaluation, and the activation store of chapters 03-05
- ``toy_models``, ``plots_superposition``  chapter 01's toy models and figures
- ``saes``, ``sae_metrics``, ``sparse_data``  chapter 02's SAEs, metrics and ground-truth data
- ``lm_saes``, ``saelens_io``  chapter 03: SAEs on the course model (training, splicing, CE loss
                  recovered, feature analysis) and export to / import from the SAELens format
- ``e2e_saes``    chapter 04: end-to-end SAEs (splice, KL, the three losses, one training loop,
                  downstream evaluation, geometry) and the ``build-e2e`` sweep
- ``transcoders``, ``circuits``  chapter 05: transcoders, paired activations, splicing, the
                  transcoder-vs-SAE sweep; exact feature-circuit decompositions, path graphs
- ``interventions``  chapter 06: exact feature edits through a spliced dictionary (error kept),
                  ablation, steering, attribution patching / integrated gradients vs true ablations
- ``clt``, ``attribution_graphs``  chapter 07: cross-layer transcoders; the local replacement
                  model, attribution graphs, pruning, interventions, circuit-tracer-style JSON
- ``bilinear``, ``bilinear_lm``  chapter 08: bilinear layers as tensors, interaction matrices,
                  eigenvectors, digit classifiers on scikit-learn's bundled 8x8 digits; a shipped
                  one-layer transformer with a bilinear MLP, its GELU twin, and token readings
- ``polytopes``   chapter 09: polytope and spline codes of ReLU MLPs, region maps, boundary crossings
- ``sae_eval``    chapter 10: ground-truth data with hierarchy, matching/MCC/F1, BatchTopK and
                  Matryoshka SAEs, training on fixed batches (ours and SAELens's), absorption on
                  known trees, sparse probing, the ``build-sae-pareto`` sweep
- ``feature_analysis``  chapter 11 (capstone): concept proxies and a lexical scanner, the neurons a
                  hook's features can be compared with, held-out tests, the public gelu-1l SAEs
"""
