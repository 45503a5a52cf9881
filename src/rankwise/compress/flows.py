"""The adapter-producing flows of :func:`rankwise.compress.compress`: ``eora`` / ``lorc`` (quantized
base + LoRA compensation), ``extract`` (LoRA from a fine-tune) and ``compeft`` (shrink an adapter).
The math is in :mod:`rankwise.compress.quantized` and :mod:`rankwise.compress.adapters`."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..core.api import adapt, adapted_layers, exact_targets
from ..errors import ConfigError, TargetError
from .adapters import adapter_tensors, check_compeft, compeft_tensor, delta_factors, differing_modules
from .engine import (
    RECORD,
    CompressionReport,
    _batches,
    _errors,
    _progress,
    _second_moments,
    _targets,
    model_bytes,
    parameter_total,
)
from .factored import check_rank
from .quantized import base_bytes, check_base, compensation, compressed_base


def _lora(model: nn.Module, names: list[str], rank: int, adapter: str, factors: dict, modules_to_save=()):
    """Add a LoRA adapter (scale 1) on ``names`` and set its factors ``{name: (B, A)}``."""
    adapt(model, "lora", name=adapter, rank=rank, alpha=float(rank), targets=exact_targets(names),
          modules_to_save=list(modules_to_save))
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for n, (b, a) in factors.items():
            ad = layers[n].adapters[adapter]
            ad.lora_B.copy_(b.to(ad.lora_B.dtype))
            ad.lora_A.copy_(a.to(ad.lora_A.dtype))


def quant_flow(model, method, *, rank, calibration, loss_fn, targets, exclude, progress, t0, quant, block_size,
               prune, adapter_name, jitter=1e-8) -> CompressionReport:
    check_base(quant if prune is None else None, prune, block_size)
    views = _targets(model, targets, exclude)
    for n, v in views.items():
        check_rank(n, v.shape, rank)
    if method == "eora" and calibration is None:
        from ..errors import CalibrationError

        raise CalibrationError("compress: 'eora' projects the error onto the eigenspace of the layers' inputs; pass "
                               "calibration=<iterable of model inputs>.")
    covs = {}
    if calibration is not None:
        src = _batches(calibration, loss_fn, progress)
        src.reusable()
        covs = _second_moments(model, views, src, method)
    report = CompressionReport(method, params_before=parameter_total(model), bytes_before=model_bytes(model),
                               adapter=adapter_name)
    bases, factors, record = {}, {}, {}
    for n in _progress(views, progress, f"compress {method}"):
        v = views[n]
        w = v.weight2d().detach()
        wq = compressed_base(w, quant if prune is None else None, prune, block_size)
        err = w.float() - wq.float() if w.dtype != torch.float64 else w - wq
        d = compensation(method, err, covs.get(n)) if method == "lorc" else _eora(err, covs[n], jitter)
        b, a = d.factors(rank)
        m, k = v.shape
        nbytes = base_bytes((m, k), quant if prune is None else None, prune, block_size, w.element_size())
        row = {"module": n, "shape": (m, k), "rank": rank, "params before": m * k, "params after": m * k + rank * (m + k),
               "kept energy": d.kept_energy(rank)}
        before = _errors(w, wq, covs.get(n))
        after = _errors(w, wq.to(b.dtype) + b @ a, covs.get(n))
        row["weight error"] = after["weight error"]
        row["weight error (no compensation)"] = before["weight error"]
        if "output error" in after:
            row["output error"] = after["output error"]
            row["output error (no compensation)"] = before["output error"]
        report.layers.append(row)
        bases[n], factors[n] = wq, (b, a)
        record[n] = ({"type": "pruned", "prune": float(prune), "bytes": nbytes} if prune is not None else
                     {"type": "quantized", "quant": quant, "block_size": block_size, "bytes": nbytes})
        record[n]["source_kind"] = v.kind
    _lora(model, list(views), rank, adapter_name, factors)  # may raise: nothing else changed yet
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for n, wq in bases.items():
            layers[n].base.weight.copy_(layers[n].view.to_param(wq))
    model.__dict__[RECORD] = {"method": method, "layers": record, "adapter": adapter_name,
                              "options": {"quant": quant, "block_size": block_size, "prune": prune, "rank": rank}}
    report.params_after, report.bytes_after = parameter_total(model), model_bytes(model)
    report.seconds = time.perf_counter() - t0
    return report


def _eora(err, cov, jitter):
    from .svd import svd_llm

    return svd_llm(err, cov, jitter)


def extract_flow(model, *, rank, ratio, targets, exclude, progress, t0, finetuned, adapter_name) -> CompressionReport:
    """LoRA of rank ``rank`` on ``model`` (the base) from ``finetuned − model`` (see compress/adapters.py)."""
    if finetuned is None or not isinstance(finetuned, nn.Module):
        raise ConfigError("compress: 'extract' needs finetuned=<the fine-tuned model> (same architecture as the base "
                          "model passed first).")
    if rank is None or ratio is not None:
        raise ConfigError("compress: 'extract' makes one LoRA adapter of one rank; give rank=<int> (not ratio).")
    views = _targets(model, targets, exclude)
    ft_modules = dict(finetuned.named_modules())
    for n, v in views.items():
        check_rank(n, v.shape, rank)
        other = ft_modules.get(n)
        if other is None or getattr(other, "weight", None) is None or other.weight.shape != v.weight.shape:
            raise TargetError(f"compress extract: module '{n}' ({tuple(v.weight.shape)}) has no counterpart of the same "
                              f"shape in the fine-tuned model; give models of the same architecture.")
    others = differing_modules(model, finetuned, list(views))
    report = CompressionReport("extract", params_before=parameter_total(model), bytes_before=model_bytes(model),
                               adapter=adapter_name)
    factors, bias_diff = {}, []
    from ..core.layers import LayerView

    for n in _progress(views, progress, "compress extract"):
        v, fv = views[n], LayerView(ft_modules[n], n)
        w0, w1 = v.weight2d().detach(), fv.weight2d().detach()
        delta = w1.float() - w0.float() if w0.dtype != torch.float64 else w1 - w0
        b, a, kept = delta_factors(delta, rank)
        factors[n] = (b, a)
        m, k = v.shape
        row = {"module": n, "shape": (m, k), "rank": rank, "params before": m * k, "params after": rank * (m + k),
               "kept energy": kept,
               "weight error": float((delta - b @ a).norm() / delta.norm().clamp_min(1e-30))}
        report.layers.append(row)
        if v.base.bias is not None and not torch.equal(v.base.bias, ft_modules[n].bias):
            bias_diff.append(n)
    _lora(model, list(views), rank, adapter_name, factors, modules_to_save=others)
    if others:
        from ..core.api import saved_module

        with torch.no_grad():
            for mname in others:
                saved_module(model, mname, adapter_name).load_state_dict(ft_modules[mname].state_dict())
        report.notes.append(f"modules_to_save (differ, not targeted): {', '.join(others)}")
    if bias_diff:
        report.notes.append(f"biases differ but LoRA cannot hold them (kept from the base): {', '.join(bias_diff[:8])}")
    report.params_after = report.params_before + sum(r["params after"] for r in report.layers)
    report.bytes_after = model_bytes(model)
    report.seconds = time.perf_counter() - t0
    return report


def compeft_flow(model, *, t0, adapter, density, alpha) -> CompressionReport:
    """ComPEFT on every tensor of adapter ``adapter`` (in place)."""
    from ..core.api import adapter_state

    check_compeft(density, alpha)
    state = adapter_state(model)
    if adapter is None:
        if len(state) != 1:
            raise TargetError(f"compeft: the model has adapters {sorted(state) or 'none'}; pass adapter=<name>.")
        adapter = next(iter(state))
    tensors = adapter_tensors(model, adapter)
    report = CompressionReport("compeft", adapter=adapter)
    new = []
    for qname, t in tensors:
        out, nbytes = compeft_tensor(t, density, alpha)
        dense = t.numel() * t.element_size()
        report.layers.append({"module": qname, "shape": tuple(t.shape), "params before": t.numel(),
                              "params after": int((out != 0).sum()), "bytes before": dense, "bytes after": nbytes,
                              "weight error": float((t.detach().float() - out.float()).norm()
                                                    / t.detach().float().norm().clamp_min(1e-30))})
        new.append((t, out))
    with torch.no_grad():
        for t, out in new:
            t.copy_(out)
    report.params_before = sum(r["params before"] for r in report.layers)
    report.params_after = sum(r["params after"] for r in report.layers)
    report.bytes_before = sum(r["bytes before"] for r in report.layers)
    report.bytes_after = sum(r["bytes after"] for r in report.layers)
    report.seconds = time.perf_counter() - t0
    return report
