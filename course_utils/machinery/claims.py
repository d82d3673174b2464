"""Replication claims as records: every number the course sets beside a paper's, with what makes
the comparison fair or not, in one table (``course claims``, ``docs/replications.md``).

A notebook's replication-check cell keeps its asserts and adds a record::

    from course_utils.machinery.claims import claim
    claim(
        "01", "pentagon",
        paper="Elhage et al. 2022 (Toy Models of Superposition), fig. 1 and section 'Superposition as a phase change'",
        quantity="5 features in 2 dimensions at high sparsity: ratio of largest to smallest feature norm; adjacent angles",
        paper_value="regular pentagon (equal norms, 72 degrees)", paper_setting="n=5, m=2, equal importance, 1-S=0.05",
        ours=f"norm ratio {ratio:.3f}, angles within {gap:.1f} degrees of 72", our_setting="same model, 1-S = 0.097/0.070/0.050",
        sample="3 sparsities, best of 10 instances each", baseline="at 1-S = 1 (dense) only 2 features are kept",
        same_quantity="yes", verdict="replicated",
    )

A "differs" verdict names its kind (``differs_kind``: "contradicts", "not comparable",
"inconclusive" or "misprint in paper"), and a verdict that rests on anything the notebook does not
compute (an issue's review, runs outside the notebook, a pending re-measurement) says what in
``provisional``; the table marks it PROVISIONAL and the summary counts those apart.

A record of ``kind="check"`` is not a replication of a paper's claim but a check that holds by
construction or that our code agrees with a reference implementation (an identity of a metric's
definition, our trainer against SAELens's); the summary counts checks apart from claims.

The record is checked against the Claims checklist (``CONVENTIONS.md``) when it is made, so a
record that breaks it fails the cell with a sentence saying which rule; it is then displayed
with its own MIME type (JupyterLab shows it as a small table) and so lives in the executed
solution notebook, where ``collect`` finds it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIME = "application/vnd.course.claim+json"
SAME_QUANTITY = ("yes", "partly", "no")
VERDICTS = (
    "replicated",
    "replicated in direction, not size",
    "not at our budget",
    "differs",
)
#: What a "differs" verdict is: our measurement disagrees with the paper's on a comparable quantity
#: ("contradicts"); the two numbers are not the same quantity or sample, so they cannot be set
#: against each other ("not comparable"); our sample or budget cannot decide the claim either way
#: ("inconclusive"); the paper's printed value or formula is wrong and ours agrees with the
#: corrected one ("misprint in paper").
DIFFERS_KINDS = ("contradicts", "not comparable", "inconclusive", "misprint in paper")
#: What a record is: a replication claim set beside a paper's, or a check (an identity true by
#: construction, or agreement of our code with a reference implementation), counted apart.
KINDS = ("claim", "check")
#: A budget is how long a method was trained or how much data it saw, not the model's size.
_BUDGET = re.compile(r"token|step|sample|batch|epoch", re.IGNORECASE)
_NOT_IN_NOTEBOOK = re.compile(r"issue \d+|outside the notebook|independent review", re.IGNORECASE)


class ClaimError(ValueError):
    """A record that breaks the Claims checklist: the message names the rule."""


@dataclass(frozen=True)
class Claim:
    chapter: str  # "05"
    key: str  # short and unique within the chapter: "tc-vs-sae-pareto"
    paper: str  # who, which paper, and where in it: "Dunefsky et al. 2024, fig. 3"
    quantity: str  # what is measured, and how it is defined
    paper_value: str  # the paper's number ("" if it gives none: say so in paper_setting)
    paper_setting: str  # model, layer, width, tokens
    ours: str  # our number
    our_setting: str  # model, layer, width, tokens, steps
    sample: str  # what the number is measured on, with n
    baseline: str  # the baseline's value, or why none applies
    same_quantity: str  # "yes" | "partly" | "no"
    verdict: str  # one of VERDICTS
    differs: str = ""  # what differs, when same_quantity is "partly" or "no"
    reason: str = ""  # what the verdict rests on (required unless "replicated")
    budgets_tried: tuple[str, ...] = field(default_factory=tuple)  # for "not at our budget"
    differs_kind: str = ""  # one of DIFFERS_KINDS, required when verdict is "differs"
    # what the verdict rests on that the notebook does not compute (an issue's review, runs made
    # outside the notebook); "" when every number the verdict rests on is computed in the notebook
    provisional: str = ""
    # "claim" (a replication of a paper's claim) or "check" (an identity true by construction, or
    # agreement of our code with a reference implementation), counted apart in the summary
    kind: str = "claim"

    def problems(self) -> list[str]:
        """Every Claims-checklist rule this record breaks, as sentences (empty when none)."""
        out = []
        for name in ("chapter", "key", "paper", "quantity", "ours", "our_setting", "sample"):
            if not str(getattr(self, name)).strip():
                out.append(f"{name} is empty")
        if not self.baseline.strip():
            out.append("no baseline: give the baseline's value or say why none applies")
        if self.same_quantity not in SAME_QUANTITY:
            out.append(f"same_quantity must be one of {SAME_QUANTITY}, not {self.same_quantity!r}")
        if self.verdict not in VERDICTS:
            out.append(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")
        if self.same_quantity in ("partly", "no") and not self.differs.strip():
            out.append(f"same_quantity is {self.same_quantity!r}: say what differs (differs=...)")
        if self.same_quantity == "no" and self.verdict.startswith("replicated"):
            out.append("a different quantity cannot replicate the paper's: use 'differs'")
        if self.paper_value.strip() and not self.paper.strip():
            out.append("a paper value needs its source (paper=...)")
        if self.verdict == "not at our budget" and len(self.budgets_tried) < 2:
            out.append("'not at our budget' needs at least two budgets tried (budgets_tried=...)")
        if self.verdict == "not at our budget" and not all(
            _BUDGET.search(b) for b in self.budgets_tried
        ):
            out.append(
                "a budget is training tokens, steps, batches, epochs or samples, not a width or a "
                "depth: name it in every budgets_tried entry (or use 'differs: inconclusive')"
            )
        if self.kind not in KINDS:
            out.append(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "check" and self.verdict != "replicated":
            out.append("a check either holds (verdict 'replicated') or fails its assert")
        if self.verdict != "replicated" and not self.reason.strip():
            out.append(f"verdict {self.verdict!r} needs what it rests on (reason=...)")
        if self.verdict == "differs" and self.differs_kind not in DIFFERS_KINDS:
            out.append(
                f"verdict 'differs' needs differs_kind, one of {DIFFERS_KINDS}, "
                f"not {self.differs_kind!r}"
            )
        if self.verdict != "differs" and self.differs_kind:
            out.append(f"differs_kind is only for verdict 'differs', not {self.verdict!r}")
        if self.differs_kind == "contradicts" and self.same_quantity == "no":
            out.append("a different quantity cannot contradict the paper's: use 'not comparable'")
        if _NOT_IN_NOTEBOOK.search(self.reason) and not self.provisional.strip():
            out.append(
                "the reason cites a measurement the notebook does not make (an issue, a review, "
                "runs outside the notebook): say so in provisional=..."
            )
        return out

    @property
    def verdict_label(self) -> str:
        """The verdict as the table shows it: "differs: contradicts", "replicated", "check: holds"."""
        if self.kind == "check":
            return "check: holds"
        return self.verdict + (f": {self.differs_kind}" if self.differs_kind else "")

    def verdict_text(self) -> str:
        """The verdict cell: label, provisional mark, reason and budgets tried."""
        text = self.verdict_label
        if self.provisional:
            text += f" [PROVISIONAL: {self.provisional}]"
        if self.reason:
            text += f" — {self.reason}"
        if self.budgets_tried:
            text += f" (budgets tried: {'; '.join(self.budgets_tried)})"
        return text

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["budgets_tried"] = list(self.budgets_tried)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claim:
        return cls(**{**data, "budgets_tried": tuple(data.get("budgets_tried", ()))})

    def markdown(self) -> str:
        same = self.same_quantity + (f" ({self.differs})" if self.differs else "")
        rows = [
            ("paper", self.paper),
            ("quantity", self.quantity),
            ("paper's value", f"{self.paper_value or '—'} ({self.paper_setting})"),
            ("ours", f"{self.ours} ({self.our_setting})"),
            ("sample", self.sample),
            ("baseline", self.baseline),
            ("same quantity", same),
            ("verdict", self.verdict_text()),
        ]
        body = "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)
        return f"**Claim {self.chapter}/{self.key}**\n\n| | |\n|---|---|\n{body}\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def make_claim(chapter: str, key: str, **fields: Any) -> Claim:
    """A replication record, checked against the Claims checklist: ClaimError names every rule
    it breaks (and an unknown or missing field)."""
    fields["budgets_tried"] = tuple(fields.get("budgets_tried", ()))
    try:
        record = Claim(chapter=str(chapter), key=key, **fields)
    except TypeError as error:
        raise ClaimError(f"claim {chapter}/{key}: {error}") from None
    problems = record.problems()
    if problems:
        raise ClaimError(
            f"claim {chapter}/{key} breaks the Claims checklist: " + "; ".join(problems)
        )
    return record


def claim(chapter: str, key: str, **fields: Any) -> None:
    """Record a replication claim in the notebook: checked (``make_claim``), then shown as a small
    table and stored in the cell's output under its own MIME type, where ``collect`` finds it.
    Returns nothing, so a claim as a cell's last line shows its table only."""
    record = make_claim(chapter, key, **fields)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # outside IPython there is nothing to display on
        return
    if get_ipython() is not None:
        display({MIME: record.to_json(), "text/markdown": record.markdown()}, raw=True)


def collect(notebook_path: Path) -> list[Claim]:
    """Every claim recorded in an executed notebook's outputs, in order."""
    data = json.loads(Path(notebook_path).read_text(encoding="utf-8"))
    found = []
    for cell in data.get("cells", []):
        for output in cell.get("outputs", []):
            record = output.get("data", {}).get(MIME)
            if record is not None:
                found.append(Claim.from_json(record))
    return found


def collect_course(root: Path) -> dict[str, list[Claim]]:
    """Claims per chapter number, from every executed solution notebook in a checkout."""
    from course_utils.machinery.chapters import available_chapters, solution_path

    return {c.number: collect(solution_path(c, root)) for c in available_chapters(root)}


def summary(claims: dict[str, list[Claim]]) -> dict[str, int]:
    """Claims per verdict (each "differs" kind also counted on its own, as "differs: kind"),
    "provisional": how many verdicts rest on something the notebooks do not compute, and
    "checks": records of kind "check", counted apart (not in the verdicts)."""
    counts = dict.fromkeys(VERDICTS, 0)
    counts.update(dict.fromkeys((f"differs: {k}" for k in DIFFERS_KINDS), 0))
    counts["provisional"] = 0
    counts["checks"] = 0
    for records in claims.values():
        for record in records:
            if record.kind == "check":
                counts["checks"] += 1
                continue
            counts[record.verdict] += 1
            if record.differs_kind:
                counts[f"differs: {record.differs_kind}"] += 1
            counts["provisional"] += bool(record.provisional)
    return counts


def summary_line(claims: dict[str, list[Claim]]) -> str:
    """The summary as one line: claims, each verdict, the differs kinds, provisional verdicts."""
    counts = summary(claims)
    total = sum(counts[v] for v in VERDICTS)
    kinds = ", ".join(f"{k}: {counts[f'differs: {k}']}" for k in DIFFERS_KINDS)
    parts = [f"{v}: {counts[v]}" for v in VERDICTS]
    parts[-1] += f" ({kinds})"
    checks = (
        f". Besides the claims, {counts['checks']} checks (identities true by construction, or our "
        "code against a reference implementation), all holding"
        if counts["checks"]
        else ""
    )
    return (
        f"{total} claims. " + " · ".join(parts) + ". Provisional (resting on measurements outside "
        "the notebooks or awaiting an issue's re-measurement or a rebuild): "
        f"{counts['provisional']} of {total}" + checks
    )


COLUMNS = (
    "claim", "paper", "quantity", "paper's value (setting)", "ours (setting)", "sample",
    "baseline", "same quantity", "verdict",
)  # fmt: skip


def _row(record: Claim) -> list[str]:
    same = record.same_quantity + (f": {record.differs}" if record.differs else "")
    verdict = record.verdict_text()
    return [
        record.key,
        record.paper,
        record.quantity,
        f"{record.paper_value or '—'} ({record.paper_setting})",
        f"{record.ours} ({record.our_setting})",
        record.sample,
        record.baseline,
        same,
        verdict,
    ]


#: Chapters whose notebooks make no replication claim (so an empty table is complete).
NO_PAPER_CLAIMS = frozenset({"00"})

#: How to read a verdict (docs/replications.md prints it under the counts).
LEGEND = (
    "How to read the verdicts:",
    "",
    '- **replicated** — our number agrees with the paper\'s, and "same quantity" says how close '
    'the two quantities are (never "no"). Where the paper gives no number ("—"), the '
    "paper's stated pattern is reproduced and the record's baseline shows it could have failed.",
    "- **replicated in direction, not size** — the paper's sign or ordering is reproduced but "
    "not its size: either our size differs from the paper's (smaller or larger), or the paper "
    "states the direction of an effect without a size, so none can be checked.",
    "- **not at our budget** — not reproduced at two or more *budgets*, listed in the verdict, "
    "with the gap shrinking towards the paper's value as the budget grows: no evidence against the "
    "paper. A budget is how much a method was trained (training tokens or steps) or how many "
    "samples it saw; a width or a depth is not a budget (a record that varies only those is "
    '"differs: inconclusive").',
    "- **differs** — always with one of four kinds:",
    '  - **differs: contradicts** — on a comparable quantity (same quantity "yes" or '
    '"partly"), our measurement disagrees with the paper\'s;',
    "  - **differs: not comparable** — the two numbers are not the same quantity, sample or "
    "setting, so neither agreement nor disagreement can be read from them;",
    "  - **differs: inconclusive** — our sample, budget or control cannot decide the claim either "
    "way;",
    "  - **differs: misprint in paper** — the paper's printed value or formula is wrong, and our "
    "measurement agrees with the corrected one.",
    "- **PROVISIONAL** (beside any verdict) — the verdict rests on something the notebook does not "
    "compute: an independent review's measurement or runs made outside the notebook, or it awaits "
    'a re-measurement tracked in an open issue of the course (cited as "issue 25", "issue 26") '
    "or a pending rebuild of a shipped dictionary. The mark says what it rests on. Read it as the "
    "current best reading, not as a checked result.",
    "- **check: holds** — not a paper's claim but a check: an identity true by construction (a "
    "metric's definition, an exact splice) or our code agreeing with a reference implementation "
    "(our trainer against SAELens's). Checks are counted apart from the claims.",
    '- **paper\'s value "—"** — the paper gives no number for this quantity; the setting in '
    "brackets says what it shows instead. A value the course computed itself (a re-run of the "
    'paper\'s setup) is never put in this column: it goes under "baseline" or "same quantity".',
)

#: Terms the records cannot avoid (docs/replications.md prints them under the legend).
GLOSSARY = (
    (
        "course-2l",
        "the course's own 2-layer transformer trained on Python code (d_model 128, two "
        "MLPs of 512 GELU neurons); hook names such as blocks.0.hook_resid_post are TransformerLens's "
        "(the residual stream after layer 0)",
    ),
    (
        "SAE, latent, L0",
        "a sparse autoencoder; its dictionary elements are latents (features); L0 "
        "is the mean number of latents active per token",
    ),
    ("dead latent", "a latent that never fires on the evaluation sample"),
    ("live latent", "a latent that fires at least once on the evaluation sample (not dead)"),
    (
        "λ, L0/d",
        "λ is the sparsity coefficient (the weight of the L1 or sparsity penalty in the "
        "loss); L0/d is L0 divided by the width of the activation it reconstructs (d_model), which "
        "puts models of different widths on one sparsity scale",
    ),
    (
        "budget",
        "how much a method was trained: training tokens or steps (or, on synthetic data, "
        "samples); not the dictionary's width or the network's depth",
    ),
    (
        "shipped, reference SAE",
        "shipped: trained once by the course's build script and stored in the "
        "repository (assets/), so notebooks load it instead of training it; the reference SAE is "
        "chapter 03's shipped 1,024-latent residual SAE that later chapters reuse; live: trained "
        "inside the notebook as it runs",
    ),
    (
        "Pareto sweep",
        "a family of models trained with several values of its sparsity knob (λ or k), "
        "read as a curve of fidelity (CE increase, FVU) against sparsity (L0); two families are "
        "compared at matched L0 or matched fidelity along the curves",
    ),
    (
        "constrained ablation",
        "ablating (or patching) a node while the rest of the computation is held "
        "fixed over a range of layers (attention patterns, LayerNorm scales and the other nodes' "
        "outputs frozen), so the change travels only along the paths the graph describes (Ameisen "
        "et al. use the range [i, i+2]; chapter 07 constrains all layers)",
    ),
    (
        "demeaned logits",
        "logits minus their mean over the vocabulary at each position, so that a "
        "shift shared by every token (which changes no probability) is not counted",
    ),
    (
        "TopK, BatchTopK, JumpReLU, Matryoshka, AuxK",
        "SAE variants: keep the k largest latents per "
        "token / per batch; a thresholded ReLU; nested prefixes of the dictionary each trained to "
        "reconstruct; AuxK is an auxiliary loss that trains dead latents on the residual error",
    ),
    (
        "MMCS",
        "mean max cosine similarity: for each true feature, the best cosine with any learned "
        "dictionary element, averaged over the true features (1 = every feature recovered)",
    ),
    ("FVU", "fraction of variance unexplained by the reconstruction (1 - explained variance)"),
    (
        "ΔCE, CE recovered, KL",
        "the increase in next-token cross-entropy (nats) when the "
        "reconstruction replaces the activation; CE recovered = (L_ablated - L_spliced) / (L_ablated "
        "- L_clean), 1 = no loss; KL(original || spliced) is the per-token KL divergence of the "
        "spliced model's next-token distribution from the original's, Σ p_orig log(p_orig / "
        "p_spliced), averaged over tokens",
    ),
    (
        "zero / mean ablation",
        "replacing an activation by zeros, or by its mean over the data; the "
        "ablated loss is the 0% end of CE recovered",
    ),
    (
        "shrinkage, γ",
        "reconstructions systematically shorter than the activation (an L1 penalty "
        "causes it); γ = Σ||x̂||² / Σ<x, x̂>, 1 when there is none",
    ),
    (
        "MCC, per-latent F1",
        "on synthetic data with known features: MCC (as SynthSAEBench in SAELens "
        "computes it) is the mean |cosine| between decoder rows and true feature directions over a "
        "one-to-one Hungarian matching (scipy's linear_sum_assignment), not a correlation of "
        "activations; per-latent F1 is how well each latent's firing predicts the firing of the "
        "true feature it is most aligned with (a latent that never fires scores 0)",
    ),
    (
        "bigram table",
        "next-token probabilities read off counts of token pairs: a model worse than "
        "it has not learnt more than pair statistics",
    ),
    (
        "de-embedding (direct / extended)",
        "which input tokens excite a feature straight through the "
        "embedding (direct), or through the embedding and an earlier layer's transcoder (extended)",
    ),
    (
        "splice, error term / error node",
        "running the model with the reconstruction in place of "
        "the activation; keeping the error a - â as an extra node makes the splice exact",
    ),
    (
        "e2e, e2e+ds, local",
        "SAEs trained on the model's output KL (end-to-end), on KL plus "
        "reconstruction at later layers (downstream), or on reconstruction at their own layer (local)",
    ),
    (
        "transcoder, PLT, CLT",
        "a sparse dictionary that maps an MLP's input to its output; per-layer "
        "transcoders (PLT) replace each MLP on its own, a cross-layer transcoder (CLT) writes from "
        "one layer to all later ones",
    ),
    (
        "completeness / replacement score",
        "Ameisen et al.'s attribution-graph scores: "
        "completeness is the share of each node's input that comes from features or embeddings "
        "rather than error nodes, weighted by the node's influence on the output; replacement is the "
        "share of end-to-end influence from the embeddings to the logits that travels through "
        "features only; node threshold: pruning keeps the nodes that carry that share of influence",
    ),
    (
        "attribution patching, IG",
        "a first-order (gradient times activation) estimate of an "
        "ablation's effect; integrated gradients (IG) averages the gradient along the path from the "
        "ablated to the real activation",
    ),
    (
        "best of N seeds / lowest-loss seed",
        "N models trained from different random "
        "initialisations; the one with the lowest training loss is kept and measured",
    ),
    (
        "1-S, density, D*, D_i",
        "the probability that a feature is non-zero (S is sparsity); "
        "D* = m / ||W||_F^2, the hidden dimensions per represented feature; D_i the share of a "
        "dimension feature i gets (1/2 for a feature in an antipodal pair: two features on one line, "
        "pointing opposite ways)",
    ),
    (
        "Spearman, Pearson",
        'rank and linear correlation; "range-restricted": measured only on the '
        "items a predictor ranked highest, which biases it",
    ),
    (
        "specificity, sensitivity",
        "of a feature's firings, the share on tokens of the concept; of "
        "the concept's tokens, the share where it fires",
    ),
    (
        "absorption",
        'a general latent ("starts with S") stays silent on some of its cases '
        'because a more specific latent (" short") has absorbed its direction there',
    ),
    (
        "purity, ARI",
        "clustering scores against labels: the share of items in their cluster's "
        "majority label; adjusted Rand index (0 = chance, 1 = identical partitions)",
    ),
    (
        "spline code, polytope boundary",
        "the on/off pattern of a ReLU network's neurons for an "
        "input; inputs with one code share one linear region (polytope), whose faces are boundaries",
    ),
)


def markdown_report(claims: dict[str, list[Claim]]) -> str:
    """docs/replications.md: a course-wide summary, then one table per chapter."""
    from course_utils.machinery.chapters import get_chapter

    lines = [
        "# What the course replicates",
        "",
        "Generated by `course build` from the executed solution notebooks (`course claims` prints "
        "the same table in a terminal); do not edit. Each row is a record made beside a notebook's "
        "replication asserts (`course_utils/machinery/claims.py`), checked against the Claims "
        "checklist of the course's conventions when it is made: a baseline or why none applies, "
        "whether the two numbers are the same quantity, and what the verdict rests on.",
        "",
        "**" + summary_line(claims) + ".**",
        "",
        *LEGEND,
        "",
        "Terms used in the records:",
        "",
        *(f"- **{term}** — {meaning}." for term, meaning in GLOSSARY),
        "",
    ]
    for number, records in sorted(claims.items()):
        title = get_chapter(number).title
        lines += [f"## {number} — {title}", ""]
        if not records and number in NO_PAPER_CLAIMS:
            lines += ["No records: this chapter sets up the tools and puts no number beside a "
                      "paper's.", ""]  # fmt: skip
            continue
        if not records:
            notebook = f"solutions/{get_chapter(number).filename}"
            lines += [f"Not recorded here yet: its replication checks are the assert cells of "
                      f"`{notebook}`.", ""]  # fmt: skip
            continue
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(_cell(v) for v in _row(r)) + " |" for r in records]
        lines.append("")
    return "\n".join(lines)


def text_report(claims: dict[str, list[Claim]]) -> str:
    """``course claims``: one block per claim, readable in an 80-column terminal."""
    out = []
    for number, records in sorted(claims.items()):
        for record in records:
            out.append(f"{number}/{record.key}  [{record.verdict_label}]")
            for name, value in zip(COLUMNS[1:], _row(record)[1:], strict=True):
                out.append(f"    {name + ':':<26}{value}")
            out.append("")
    out.append(summary_line(claims) + ".")
    return "\n".join(out)
