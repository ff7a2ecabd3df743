"""Each task's generations against its targets: one function per task, from the examples
and the generated answer spans (None where the model wrote no span of the answer's modality)
to the task's metrics (docs/generate_eval.md defines them).

A generation that cannot be decoded still counts: a missing mask is an empty mask, an SVG
that does not parse or render is a white canvas, an image span that is not decodable is a
black picture, a missing text answer is the empty string; `valid` is the share of
generations that decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mmfm.config.schema import TaskConfig
from mmfm.core.errors import LaunchError
from mmfm.core.types import Modality
from mmfm.decoding.layout import Layout
from mmfm.decoding.outputs import Span, whole_frames
from mmfm.tasks import metrics
from mmfm.tasks.examples import Example, label_repeat
from mmfm.tokenization.svg import SvgError, parse_svg, render_svg
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.vocab import VocabError

Scorer = Callable[
    [TaskConfig, Sequence[Example], Sequence["Span | None"], Tokenizers, Layout], dict
]


def prefixes(task: TaskConfig, most: int) -> list[int]:
    """The mask-token prefix lengths of the IoU curve: the task's, else 1, 2, 4, ... most."""
    if task.prefixes:
        return sorted(set(task.prefixes))
    steps = [2**i for i in range(most.bit_length()) if 2**i < most]
    return [*steps, most]


def segmentation(task, examples, answers, tokenizers, layout) -> dict[str, float]:
    """Mean and cumulative IoU of the decoded masks, and the mean IoU of the first k codes
    (HiMTok's coarse-to-fine curve; an answer shorter than k is decoded whole)."""
    ks = prefixes(task, layout.tokens_per_item["mask"])
    size = tokenizers.visual.model("mask").cfg.mask_size
    full, curve = [], {k: [] for k in ks}
    valid = 0
    for example, span in zip(examples, answers, strict=True):
        codes = span.body if span is not None else []
        masks = _masks(tokenizers, codes, ks)
        valid += masks is not None
        target = vdata.square(example.target.value.astype(np.uint8), size)
        empty = np.zeros_like(target)
        full.append(metrics.overlap(masks[len(codes)] if masks else empty, target))
        for k in ks:
            curve[k].append(metrics.overlap(masks[min(k, len(codes))] if masks else empty, target))
    scores = {**metrics.mask_ious(full), "valid": valid / len(examples)}
    scores.update({f"miou@{k}": metrics.mask_ious(curve[k])["miou"] for k in ks})
    return scores


def _masks(tokenizers: Tokenizers, codes: list[int], ks: list[int]) -> dict[int, np.ndarray] | None:
    """The mask of the first k codes for every k wanted (and of all codes), or None when the
    codes do not decode (none, or ids outside the mask codebook)."""
    if not codes:
        return None
    try:
        return {
            n: tokenizers.visual.decode(Modality.MASK, codes[:n])
            for n in sorted({min(k, len(codes)) for k in ks} | {len(codes)})
        }
    except VocabError:
        return None


def svg(task, examples, answers, tokenizers, layout) -> dict[str, float]:
    """The share of generations that parse (the hardened parser) and render (cairosvg), and
    MSE and SSIM of the generated against the target SVG rendered at `render_size`."""
    size = task.render_size
    parsed = rendered = 0
    errors, similarity = [], []
    for example, span in zip(examples, answers, strict=True):
        target = _render(example.target.value, size)
        if target is None:
            raise SvgError(
                f"eval.tasks[svg]: {example.where}: the target SVG does not render: remove it "
                "from the examples"
            )
        code = layout.decode_text(span.body) if span is not None else ""
        ok = _parses(code)
        picture = _render(code, size) if ok else None
        parsed += ok
        rendered += picture is not None
        picture = np.full_like(target, 255) if picture is None else picture
        errors.append(metrics.mse(picture, target))
        similarity.append(metrics.ssim(picture, target))
    n = len(examples)
    return {
        "parse_rate": parsed / n,
        "render_rate": rendered / n,
        "mse": float(np.mean(errors)),
        "ssim": float(np.mean(similarity)),
    }


def _parses(code: str) -> bool:
    try:
        parse_svg(code, max_kb=1 << 20, origin="generated SVG")
    except SvgError:
        return False
    return True


def _render(code: str, size: int) -> np.ndarray | None:
    """The SVG drawn on white, None where cairosvg cannot draw it; a missing cairosvg is
    the user's to install (LaunchError), not a bad SVG."""
    try:
        return render_svg(code, size)
    except LaunchError:
        raise
    except Exception:  # cairosvg raises what its parsers raise on bad input
        return None


def image(task, examples, answers, tokenizers, layout) -> dict[str, float]:
    """PSNR and SSIM of each decoded generation against the target picture's own
    reconstruction through the image tokenizer (the best the codes can draw)."""
    return _pictures(Modality.IMAGE, examples, answers, tokenizers, layout)


def video(task, examples, answers, tokenizers, layout) -> dict[str, float]:
    """PSNR and SSIM of each generated clip against the target clip's reconstruction
    through the video tokenizer, frame by frame (frames the generation lacks are black,
    frames beyond the target's are not scored), averaged over the frames of each clip."""
    return _pictures(Modality.VIDEO, examples, answers, tokenizers, layout)


def _pictures(modality: Modality, examples, answers, tokenizers, layout) -> dict[str, float]:
    name = "image" if modality == Modality.IMAGE else "video"
    psnrs, ssims, valid = [], [], 0
    for example, span in zip(examples, answers, strict=True):
        ids, _ = tokenizers.visual.span(name, example.target.value)
        reference = tokenizers.visual.decode(modality, ids[1:-1])
        picture = None
        if span is not None:
            try:
                body = span.body
                if modality == Modality.VIDEO:  # a clip cut short: its whole frames
                    body, _ = whole_frames(body, layout)
                picture = tokenizers.visual.decode(modality, body)
            except ValueError:  # VocabError: not decodable; no whole frame
                picture = None
        valid += picture is not None
        frames = reference if modality == Modality.VIDEO else reference[None]
        made = np.zeros_like(frames)
        if picture is not None:
            picture = picture if modality == Modality.VIDEO else picture[None]
            made[: len(picture)] = picture[: len(frames)]
        psnrs.append(np.mean([metrics.psnr(a, b) for a, b in zip(made, frames, strict=True)]))
        ssims.append(np.mean([metrics.ssim(a, b) for a, b in zip(made, frames, strict=True)]))
    n = len(examples)
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "valid": valid / n}


def answer_text(span: Span | None, layout: Layout) -> str:
    return layout.decode_text(span.body).strip() if span is not None else ""


def dna_classify(task, examples, answers, tokenizers, layout) -> dict[str, float]:
    """Accuracy and MCC of the generated labels (`metrics.majority_label`: a label written
    several times, as trained with label_repeat, is voted; `valid`: the share of answers
    that are one of the targets' labels)."""
    targets = [example.target.value.strip() for example in examples]
    labels = sorted(set(targets))
    label_repeat(task)  # checked; the targets were read with one label each
    preds = [metrics.majority_label(answer_text(span, layout), labels) for span in answers]
    return {
        "accuracy": metrics.accuracy(preds, targets),
        "mcc": metrics.mcc(preds, targets),
        "valid": sum(p in labels for p in preds) / len(preds),
    }


def text(task, examples, answers, tokenizers, layout) -> dict[str, float]:
    """Exact match of the stripped answer, and per-token accuracy of its text tokens."""
    preds = [answer_text(span, layout) for span in answers]
    targets = [example.target.value.strip() for example in examples]
    return {
        "exact_match": metrics.accuracy(preds, targets),
        "token_accuracy": metrics.token_accuracy(
            [layout.encode_text(p) for p in preds], [layout.encode_text(t) for t in targets]
        ),
    }


SCORERS: dict[str, Scorer] = {
    "segmentation": segmentation,
    "svg": svg,
    "dna-classify": dna_classify,
    "image": image,
    "video": video,
    "text": text,
}
