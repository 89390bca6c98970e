"""Faulty factories for batched / multi-call generation (the acceptance faults of issue 10).

Each ``FAULTS[key](name) -> (model, processor)`` builds the REAL embedded model ``name``
(``vlmscope_models.load_embedded``) and patches it, or its processor, in a few lines that
reproduce the mechanism of a public bug:

=====================  =======================================================================
key                    mechanism (public report)
=====================  =======================================================================
stale-delta            a later ``generate`` call takes its prefill positions from the
                       ``rope_deltas`` an earlier call left on the model
                       (transformers PR #43952 / issue #36009)
mmtt-right-padded      prompts left-padded, ``mm_token_type_ids`` right-padded (TRL #5785)
mmtt-left-padded       the mirror image: prompts right-padded, ``mm_token_type_ids`` left-padded
shared-delta           one rope delta (row 0's) serves every row after the prefill (mlx-vlm #1143)
shared-delta-row1      the same with row 1's delta
int-seconds            ``second_per_grid_ts`` cast to int before ``get_rope_index``
                       (lmms-eval #1393): 0.5 s per grid -> 0, the temporal axis collapses
seconds-dropped        ``second_per_grid_ts`` not passed to ``get_rope_index`` (transformers #41152)
features-swapped       the per-image features of two rows swapped before the splice (lmms-eval #971)
features-rotated       three rows' features flattened in a rotated row order
mask-not-extended      decode steps append 0, not 1, to the 2-D mask of a row that has padding
mask-kept              decode steps keep the prompt's 2-D mask (never extended; padded with 0)
padding-counted        ``get_rope_index`` called without the attention mask: the prefill
                       positions count the padding (decode positions from the mask + delta)
padding-counted-decode decode positions from the cache index + delta (arange, padding counted)
=====================  =======================================================================

The shared-delta and padding-counted faults take decode positions from ``rope_deltas``
(``attention_mask.cumsum(-1) - 1 + delta``) instead of ``generate``'s "last position + 1", as
transformers 4.x and mlx-vlm do; that path is clean by itself (``decode_from_deltas``, the
reference they are compared with), the fault is the one line named above. (transformers 5.24's
own ``compute_3d_position_ids`` cannot serve: with a 2-D mask and a cache it returns positions
for the whole mask, not the new token.)
"""

from __future__ import annotations

from typing import Callable

import torch


_PRISTINE: dict[str, tuple] = {}


def _load(name: str, **options):
    """A fresh copy of the embedded model and its processor (built once per process, then
    deep-copied: the faults patch the copy, never a shared model)."""
    import copy

    import vlmscope_models

    key = repr((name, sorted(options.items())))
    if key not in _PRISTINE:
        _PRISTINE[key] = vlmscope_models.load_embedded(name, **options)
    return copy.deepcopy(_PRISTINE[key])


# ---------------------------------------------------------------------------------- helpers


def decode_from_deltas(model, *, use_mask: bool = True) -> None:
    """Decode positions from ``rope_deltas``: the new token of row ``b`` gets ``text + delta[b]``
    on t/h/w, with ``text`` its 1-D position from the 2-D mask (``cumsum - 1``), the rule of
    transformers 4.x, mlx-vlm and of ``_prepare_position_ids_for_generation`` when it continues
    from a cache -- instead of ``generate``'s "last position + 1". Clean on its own; a delta of
    shape ``[1, 1]`` is repeated over the batch (as ``compute_3d_position_ids`` does).
    ``use_mask=False`` takes ``text`` from the cache index instead (padding counted)."""
    update = model._update_model_kwargs_for_generation

    def _update(outputs, model_kwargs, *args, **kwargs):
        out = update(outputs, model_kwargs, *args, **kwargs)
        pos, mask = out["position_ids"], out["attention_mask"]
        batch = mask.shape[0]
        if use_mask:
            text = mask.long().cumsum(-1)[:, -1:] - 1
        else:
            text = torch.full((batch, 1), mask.shape[-1] - 1, dtype=torch.long)   # the cache index
        delta = model.model.rope_deltas
        delta = delta.repeat_interleave(batch // delta.shape[0], dim=0)
        new = torch.cat([text[None], (text + delta)[None].expand(3, -1, -1)], dim=0)
        out["position_ids"] = torch.cat([pos[..., :-1], new.to(pos)], dim=-1)
        return out

    model._update_model_kwargs_for_generation = _update


def _wrap_rope_index(model, edit: Callable[[dict], None]) -> None:
    inner = model.model.get_rope_index

    def get_rope_index(input_ids, *args, **kwargs):
        edit(kwargs)
        return inner(input_ids, *args, **kwargs)

    model.model.get_rope_index = get_rope_index


# ---------------------------------------------------------------------------------- the faults


def stale_delta(name: str, **options):
    """The prefill of every call after the first takes ``text positions + rope_deltas`` from the
    delta the FIRST call left on the model (it is never refreshed: call 3 still uses call 1's)."""
    model, proc = _load(name, **options)
    clean = model._prepare_position_ids_for_generation
    from transformers import GenerationMixin

    def prepare(inputs_tensor, model_kwargs):
        if model.model.rope_deltas is not None:   # the bug: a cached delta is trusted on a new call
            text = GenerationMixin._prepare_position_ids_for_generation(model, inputs_tensor, model_kwargs)
            shifted = (text + model.model.rope_deltas)[None].expand(3, -1, -1)
            return torch.cat([text[None], shifted], dim=0)
        return clean(inputs_tensor, model_kwargs)

    model._prepare_position_ids_for_generation = prepare
    return model, proc


def _mmtt_shift(name: str, direction: int, **options):
    """The processor's ``mm_token_type_ids`` are padded on the other side from the prompts:
    each row's markers move by its padding length (``direction`` -1: left, +1: right)."""
    model, proc = _load(name, **options)
    cls = type(proc)

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        mmtt, mask = out.get("mm_token_type_ids"), out.get("attention_mask")
        if mmtt is not None and mask is not None:
            rows = [torch.roll(r, direction * int((m == 0).sum())) for r, m in zip(mmtt, mask)]
            out["mm_token_type_ids"] = torch.stack(rows)
        return out

    proc.__class__ = type(cls.__name__, (cls,), {"__call__": __call__})
    return model, proc


def mmtt_right_padded(name: str, **options):
    return _mmtt_shift(name, -1, **options)


def mmtt_left_padded(name: str, **options):
    return _mmtt_shift(name, +1, **options)


def _shared_delta(name: str, row: int, **options):
    model, proc = _load(name, **options)
    prepare = model._prepare_position_ids_for_generation

    def _prepare(inputs_tensor, model_kwargs):
        pos = prepare(inputs_tensor, model_kwargs)
        model.model.rope_deltas = model.model.rope_deltas[row:row + 1]   # the bug: one delta kept
        return pos

    model._prepare_position_ids_for_generation = _prepare
    decode_from_deltas(model)
    return model, proc


def shared_delta(name: str, **options):
    return _shared_delta(name, 0, **options)


def shared_delta_row1(name: str, **options):
    return _shared_delta(name, 1, **options)


def int_seconds(name: str, **options):
    model, proc = _load(name, **options)

    def edit(kwargs):
        s = kwargs.get("second_per_grid_ts")
        if s is not None:
            kwargs["second_per_grid_ts"] = torch.as_tensor(s).long()   # the bug: 0.5 -> 0

    _wrap_rope_index(model, edit)
    return model, proc


def seconds_dropped(name: str, **options):
    model, proc = _load(name, **options)
    _wrap_rope_index(model, lambda kwargs: kwargs.pop("second_per_grid_ts", None))
    return model, proc


def _features_permuted(name: str, perm: Callable[[int], list[int]], **options):
    model, proc = _load(name, **options)
    inner = model.model.get_image_features

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):   # generate reads the names
        out = inner(pixel_values, image_grid_thw, **kwargs)
        feats = out.pooler_output
        out.pooler_output = tuple(feats[i] for i in perm(len(feats)))   # the bug: wrong order
        return out

    model.model.get_image_features = get_image_features
    return model, proc


def features_swapped(name: str, **options):
    """Images 0 and 1 (the first two rows, same-size images) trade features."""
    return _features_permuted(name, lambda n: [1, 0] + list(range(2, n)), **options)


def features_rotated(name: str, **options):
    """Every image takes the next one's features (rows flattened in a rotated order)."""
    return _features_permuted(name, lambda n: [(i + 1) % n for i in range(n)], **options)


def _mask_fault(name: str, keep_old: bool, **options):
    model, proc = _load(name, **options)
    update = model._update_model_kwargs_for_generation

    def _update(outputs, model_kwargs, *args, **kwargs):
        mask = model_kwargs.get("attention_mask")
        out = update(outputs, model_kwargs, *args, **kwargs)
        if mask is not None:
            if keep_old:
                out["attention_mask"] = mask   # the bug: the prompt's mask, never extended
            else:
                full = mask.bool().all(-1, keepdim=True).to(mask.dtype)   # the bug: 0 for padded rows
                out["attention_mask"] = torch.cat([mask, full.expand(-1, out["attention_mask"].shape[1]
                                                                       - mask.shape[1])], dim=-1)
        return out

    model._update_model_kwargs_for_generation = _update
    return model, proc


def mask_not_extended(name: str, **options):
    return _mask_fault(name, False, **options)


def mask_kept(name: str, **options):
    return _mask_fault(name, True, **options)


def padding_counted(name: str, **options):
    model, proc = _load(name, **options)
    _wrap_rope_index(model, lambda kwargs: kwargs.pop("attention_mask", None))
    decode_from_deltas(model)
    return model, proc


def padding_counted_decode(name: str, **options):
    model, proc = _load(name, **options)
    decode_from_deltas(model, use_mask=False)
    return model, proc


FAULTS: dict[str, Callable] = {
    "stale-delta": stale_delta,
    "mmtt-right-padded": mmtt_right_padded,
    "mmtt-left-padded": mmtt_left_padded,
    "shared-delta": shared_delta,
    "shared-delta-row1": shared_delta_row1,
    "int-seconds": int_seconds,
    "seconds-dropped": seconds_dropped,
    "features-swapped": features_swapped,
    "features-rotated": features_rotated,
    "mask-not-extended": mask_not_extended,
    "mask-kept": mask_kept,
    "padding-counted": padding_counted,
    "padding-counted-decode": padding_counted_decode,
}


def clean(name: str, **options):
    """The embedded model as shipped (the reference the faults are compared with)."""
    return _load(name, **options)


def clean_decode_from_deltas(name: str, **options):
    """The clean model with decode positions from ``rope_deltas`` (the reference of the faults
    that route decode positions that way)."""
    model, proc = _load(name, **options)
    decode_from_deltas(model)
    return model, proc
