"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022, arXiv:2203.05482), for adapters.

* ``soup`` — the uniform soup: the average ``(1/n) Σ_t ΔW_t`` of all ``n`` adapters (exact, by
  concatenating their factors; ``modules_to_save`` are averaged too).
* ``greedy_soup`` — the paper's Recipe 1 with a validation callback ``score(model) -> float`` (higher is
  better): score each adapter alone, sort them by score (best first), start the soup with the best, and
  add each next adapter when the uniform average of the soup plus that adapter scores at least as well
  as the soup without it (the paper's ``≥``; ties keep the adapter). The result is the uniform average of
  the chosen ingredients; the ingredients and scores are recorded in
  ``adapter_state(model)[name]["combine"]``.

Both take no ``weights`` (the average is uniform). While ``greedy_soup`` scores, each candidate is a
temporary adapter made active alone; the model's active and merged adapters are restored afterwards
(and on any error, with the temporary adapter removed).
"""

from __future__ import annotations

from ..core.api import adapter_state, delete, restore, set_active, snapshot
from ..errors import ConfigError
from .engine import REQUIRED
from .linear import cat


def _uniform(n: int) -> list[float]:
    return [1.0 / n] * n


def _no_weights(method: str, weights) -> None:
    if weights is not None:
        raise ConfigError(f"method '{method}' averages its adapters uniformly and takes no weights; leave "
                          "weights out (None), or use method='linear' for a weighted sum.")


def soup(model, adapters, weights, name, opts, generator=None, progress=False, record=None):
    from . import combine_layers

    _no_weights("soup", weights)
    w = _uniform(len(adapters))
    record = {**(record or {}), "weights": w}
    return combine_layers(model, adapters, w, name, cat, {}, generator, progress, record)


def greedy_soup(model, adapters, weights, name, opts, generator=None, progress=False, record=None):
    from tqdm.auto import tqdm

    from . import combine_layers

    _no_weights("greedy_soup", weights)
    score = opts["score"]
    state = adapter_state(model)
    tmp = f"{name}__soup_candidate"
    while tmp in state:
        tmp += "_"
    snap = snapshot(model)
    try:
        single = {}
        for a in adapters:
            set_active(model, a)
            single[a] = float(score(model))
        order = sorted(adapters, key=lambda a: -single[a])
        chosen, best = [order[0]], single[order[0]]
        trials = []
        for a in tqdm(order[1:], disable=not progress, desc="greedy soup"):
            cand = chosen + [a]
            combine_layers(model, cand, _uniform(len(cand)), tmp, cat, {}, generator)
            try:
                s = float(score(model))
            finally:
                delete(model, tmp)
            trials.append((a, s))
            if s >= best:
                chosen, best = cand, s
    finally:
        if tmp in state:
            delete(model, tmp)
        restore(model, snap)
    w = _uniform(len(chosen))
    record = {**(record or {}), "weights": w, "ingredients": chosen, "scores": single, "trials": trials,
              "soup_score": best}
    record["options"] = {}
    return combine_layers(model, chosen, w, name, cat, {}, generator, progress, record)


def check_options(method: str, opts: dict) -> None:
    if method == "greedy_soup" and not callable(opts.get("score")):
        raise ConfigError(f"greedy_soup needs score=, a function score(model) -> float on validation data "
                          f"(higher is better); got {opts.get('score')!r}.")


METHODS = {
    "soup": (soup, {}, "uniform soup: the average of the adapters' updates (Wortsman et al. 2022)", "uniform"),
    "greedy_soup": (greedy_soup, {"score": REQUIRED},
                    "greedy soup: add adapters best-first while the validation score does not drop", "uniform"),
}
