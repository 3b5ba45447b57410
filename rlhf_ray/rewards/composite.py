"""A composite reward (``models.reward.kind: composite``): several rewards of any kind, each weighted and routed to
the prompts it scores — maths prompts to a verifier, chat prompts to an RM, a length or format term on all of them.

For sample i, with the components C(i) that score it (no route, or its data column's value in the route's values):

    score_i = Σ_{c ∈ C(i)} weight_c · norm_c(raw_c,i)

``norm_c``: the component's own models.reward.normalize ('none' or 'stored') and clip (rlhf_ray.rewards.normalize);
the composite's normalize ('running' or 'none') and clip then apply to the sum on the driver, as for any reward.
A sample that no component scores is an error naming its column values: a silent 0 would train on a reward nobody
defined. Per step, for each component: reward/<name>/raw_mean, reward/<name>/norm_mean (over the samples it scored)
and reward/<name>/count, plus whatever the component's backend records (its cache hits: reward/<name>/cache_hits).

Every component's backend lives in the one reward actor that hosts the composite (a model component loads its RM
there, on that actor's resources.reward.num_gpus); a component's failure stops the run with one line naming it.
"""
from __future__ import annotations

import torch

from rlhf_ray.rewards.base import RewardBackend, RewardSample
from rlhf_ray.rewards.normalize import ScoreNormalizer
from rlhf_ray.rewards.stats import RewardStats


class RewardComponentError(RuntimeError):
    """A component of a composite failed: one line naming it, its backend and what it raised."""


def routed(components, samples: list[RewardSample]) -> torch.Tensor:
    """[C, B] bool: whether component c scores sample b (no route: every sample)."""
    mask = torch.ones(len(components), len(samples), dtype=torch.bool)
    for c, component in enumerate(components):
        if component.route is not None:
            values, column = component.route.values(), component.route.field
            mask[c] = torch.tensor([s.fields.get(column) in values for s in samples], dtype=torch.bool)
    return mask


def weighted_sum(normalised: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """score_b = Σ_c mask[c, b] · weight_c · normalised[c, b]: [C, B], [C, B] bool, [C] → [B] (float32)."""
    terms = torch.where(mask, weights[:, None].double() * normalised.double(), torch.zeros((), dtype=torch.float64))
    return terms.sum(0).float()


def unrouted_message(sample: RewardSample, index: int, components) -> str:
    columns = sorted({c.route.field for c in components})
    has = ", ".join(f"{column}={sample.fields.get(column)!r}" for column in columns)
    routes = "; ".join(f"{c.name}: {c.route.field} in {sorted(c.route.values())}" for c in components)
    return (f"models.reward.components: no component scores sample {index} ({has}; routes: {routes}); add a "
            "component without a route, or a route for that value")


class CompositeBackend(RewardBackend):
    """The components' backends (built by ``build``, rlhf_ray.rewards.backends.build_backend, each behind the score
    cache where its config asks for one), their normalisers and weights."""

    def __init__(self, cfg, *, build, model_path: str | None = None, dtype: str = "float32", num_gpus: float = 0.0,
                 store=None):
        super().__init__(cfg)
        self.components = cfg.components
        self.backends = []
        for component in self.components:
            try:
                # a model or judge component's `model` is its resolved path (with_resolved_models)
                backend = build(inherit_cache(component, cfg), model_path=component.model if component.loads_model
                                else None, dtype=dtype, num_gpus=num_gpus, store=store)
            except Exception as err:
                raise RewardComponentError(f"reward component {component.name!r} ({component.kind}) cannot start: "
                                           f"{type(err).__name__}: {err}") from err
            self.backends.append(backend)
        self.normalizers = [ScoreNormalizer(c.normalize, b.stored_statistics() if c.normalize == "stored" else None,
                                            c.clip) for c, b in zip(self.components, self.backends)]
        self.weights = torch.tensor([c.weight for c in self.components], dtype=torch.float64)

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        mask = routed(self.components, samples)
        uncovered = (~mask.any(0)).nonzero().flatten().tolist()
        if uncovered:
            raise ValueError(unrouted_message(samples[uncovered[0]], uncovered[0], self.components))
        normalised = torch.zeros(mask.shape, dtype=torch.float64)
        for c, (component, backend) in enumerate(zip(self.components, self.backends)):
            rows = mask[c].nonzero().flatten()
            if not len(rows):
                self.stats.add_total(f"{component.name}/count", 0)
                continue
            raw = self._score_component(c, [samples[i] for i in rows.tolist()])
            norm = self.normalizers[c](raw)
            normalised[c, rows] = norm.double()
            self.stats.add_values(f"{component.name}/raw_mean", raw)
            self.stats.add_values(f"{component.name}/norm_mean", norm)
            self.stats.add_total(f"{component.name}/count", len(rows))
            own = backend.take_stats()
            self.stats.merge(own.prefixed(f"{component.name}/"))
            self.stats.merge(_cache_totals(own))  # reward/cache_*: every component's cache together
        return weighted_sum(normalised, mask, self.weights)

    def _score_component(self, c: int, samples: list[RewardSample]) -> torch.Tensor:
        component, backend = self.components[c], self.backends[c]
        try:
            raw = backend.score(samples).float()
        except Exception as err:
            what = " ".join(str(err).split())  # one line, whatever the backend wrote
            raise RewardComponentError(f"reward component {component.name!r} ({backend.describe()}) raised "
                                       f"{type(err).__name__}: {what}") from err
        if raw.shape != (len(samples),):
            raise RewardComponentError(f"reward component {component.name!r} ({backend.describe()}) gave "
                                       f"{tuple(raw.shape)} scores for {len(samples)} samples")
        return raw

    def stored_statistics(self) -> dict | None:
        return None  # each component normalises with its own (models.reward.components[*].normalize)

    def describe(self) -> str:
        return "composite of " + ", ".join(f"{c.name} ({b.describe()})" for c, b in zip(self.components,
                                                                                          self.backends))

    @property
    def model(self):
        """The RM of the first model component (the reward role's memory readings)."""
        found = next((b.model for b in self.backends if hasattr(b, "model")), None)
        if found is None:
            raise AttributeError("no component of this composite is a model")
        return found


def _cache_totals(stats: RewardStats) -> RewardStats:
    """The cache figures of one component's stats, to be summed over components."""
    return RewardStats({k: v for k, v in stats.totals.items() if k.startswith("cache_")},
                       {k: v for k, v in stats.means.items() if k.startswith("cache_")})


def inherit_cache(component, composite):
    """A component's config with the composite's cache settings where it sets none of its own (null)."""
    return component.model_copy(update={k: getattr(composite, k) for k in ("cache", "cache_path")
                                         if getattr(component, k) is None})


def with_resolved_models(cfg, resolve):
    """``cfg`` with the models the reward actors load besides its own — each model component's `model` and each
    pairwise judge's `judge.baseline` (its own or a component's) — replaced by ``resolve(spec)``, their local paths."""
    def baseline_resolved(reward):
        if reward.kind != "judge" or reward.judge.baseline is None:
            return reward
        return reward.model_copy(update={"judge": reward.judge.model_copy(
            update={"baseline": resolve(reward.judge.baseline)})})

    if cfg.kind != "composite":
        return baseline_resolved(cfg)
    return cfg.model_copy(update={"components": [
        baseline_resolved(c.model_copy(update={"model": resolve(c.model)}) if c.loads_model else c)
        for c in cfg.components]})


def other_models(cfg) -> dict[str, str]:
    """The models ``with_resolved_models`` resolves: spec -> the config key that names it."""
    found = {}
    for reward in cfg.components if cfg.kind == "composite" else [cfg]:
        key = f"models.reward.components[{reward.name}]" if reward.is_component else "models.reward"
        if reward.is_component and reward.loads_model:
            found.setdefault(reward.model, f"{key}.model")
        if reward.kind == "judge" and reward.judge.baseline is not None:
            found.setdefault(reward.judge.baseline, f"{key}.judge.baseline")
    return found


def model_components(cfg) -> list:
    """The components of a composite that are models (none for any other kind)."""
    return [c for c in cfg.components if c.loads_model] if cfg.kind == "composite" else []
