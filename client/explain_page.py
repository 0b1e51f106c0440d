"""index.html of `fedscan site explain`: one self-contained page for the site's radiologists.

It shows the site's scores, then every explained case, the most wrong or uncertain first: the
overlays, the prediction, the ground truth and the uncertainty. Built with
``fedscan.common.html_page``: no script, no external address, every text escaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedscan.common.html_page import escape, figure, page, table
from fedscan.common.tasks.registry import SCORE_TITLES

if TYPE_CHECKING:
    from fedscan.client.explain import Case, Explanation


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary(ex: Explanation) -> str:
    rows = [
        ("site", ex.site),
        ("model", f"{ex.model} ({ex.task})"),
        ("weights", f"{ex.weights}, round {ex.round} of a {ex.strategy} run"),
        (
            "validation cases",
            f"{ex.validation_cases}, of which the {ex.shown} most wrong or uncertain are shown",
        ),
    ]
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    note = (
        '<p class="note">Computed at this site; nothing here was sent anywhere. The page names '
        "series by their SeriesInstanceUID so you can find them in your PACS: "
        "keep it inside the hospital.</p>"
    )
    return f'<dl class="summary">{items}</dl>{note}'


def _scores(ex: Explanation) -> str:
    rows = [([escape(SCORE_TITLES.get(k, k)), _num(v)], "") for k, v in ex.scores.items()]
    rows += [([escape(k), _num(v)], "") for k, v in ex.metrics.items()]
    return (
        "<h2>Scores on all validation cases</h2>"
        '<p class="note">The first rows are the scores this site shares in the federated evaluation '
        "(single numbers, no image content); the others are the usual validation metrics.</p>"
        + table(["score", "value"], rows)
    )


def _case_facts(case: Case) -> list[tuple[str, str]]:
    facts = [("series", case.series_uid)]
    if case.slice is not None:
        facts.append(("image", f"{case.slice + 1} of the series' labelled images"))
    if case.kind == "series":
        facts += [
            ("Dice", _num(case.dice)),
            ("wrong voxels", f"{100 * (case.wrong_voxels or 0):.2f}%"),
            ("mean uncertainty", _num(case.mean_uncertainty)),
            ("uncertainty AUROC", _num(case.uncertainty_auroc)),
        ]
        lesions = case.lesions or []
        facts.append(
            (
                "predicted lesions",
                ", ".join(
                    f"slice {les.slice + 1}: {les.pixels} px, confidence {les.confidence:.2f}"
                    for les in lesions
                )
                or "none",
            )
        )
    else:
        probs = ", ".join(f"{p:.3f}" for p in case.probabilities or [])
        facts += [
            ("truth", str(case.true_class)),
            ("prediction", f"class {case.predicted_class} ({probs})"),
            ("uncertainty", _num(case.uncertainty)),
        ]
        if case.lesion_slices is not None:
            facts.append(
                ("images with a lesion", ", ".join(str(s + 1) for s in case.lesion_slices) or "none")
            )
    return facts


def _case(case: Case, png: bytes | None) -> str:
    wrong = case.correct is False or (case.dice is not None and case.dice < 0.5)
    status = '<span class="warn">wrong</span>' if wrong else ""
    facts = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in _case_facts(case))
    return (
        f'<section class="case" id="{escape(case.id)}"><h2>{escape(case.id)} {status}</h2>'
        f'<dl class="summary">{facts}</dl>'
        + figure(png, f"explanation of {case.id}", _caption(case))
        + "</section>"
    )


def _caption(case: Case) -> str:
    if case.kind == "series":
        return (
            "Image, ground truth, prediction (numbers: each lesion's confidence), and the uncertainty "
            "(entropy of test-time augmentation, 0 to 1)."
        )
    if case.kind == "exam":
        return (
            "The image the model attended to most, its Grad-CAM and integrated gradients, and the attention "
            "weight of each image of the exam."
        )
    return "Image, Grad-CAM and integrated gradients for the predicted class."


def explain_html(ex: Explanation, figures: dict[str, bytes]) -> str:
    """The page; ``figures`` maps each case id to its PNG."""
    sections = [_summary(ex), _scores(ex), *(_case(c, figures.get(c.id)) for c in ex.cases[: ex.shown])]
    footer = f"Written by fedscan {escape(ex.fedscan_version)} with `fedscan site explain`."
    return page(f"fedscan explanations: {ex.site}", f"Explanations at {ex.site}", sections, footer)
