"""Byzantine client behaviours for research and robustness benchmarks: a registry of seeded corruptions.

An attack turns an honest reply (the adapter ``state`` a client trained from the global ``reference``, and
its example count) into what a faulty or hostile client sends instead:
``attack(state, reference, num_examples, rng) -> (state, count)``. The count may come back NaN, infinite,
negative or absurdly large. Attacks never mutate their inputs and draw randomness only from ``rng``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from fedpetah.registry import Registry
from fedpetah.wire.protocol import ATTACK_ENV, Status, TrainReply, TrainRequest

StateDict = dict[str, torch.Tensor]
Attack = Callable[[StateDict, StateDict, int, np.random.Generator], tuple[StateDict, float]]

ATTACKS: Registry[Attack] = Registry("attack")

HUGE_SCALE = 1e4
"""``huge_norm`` sends ``reference - HUGE_SCALE * (state - reference)``: the honest step, reversed and blown up."""
INFLATED_COUNT = 1e6
"""Above any client's share of a task (split_mnist tasks hold about 1,600 training images), yet below the
protocol's ``MAX_EXAMPLES`` bound, so it reaches aggregation: 1e9 is refused when the reply is decoded."""
NEGATIVE_COUNT = -1000.0
NOISE_STD = 1.0
"""``noise`` adds i.i.d. N(0, NOISE_STD**2) to every value: far larger than an honest local step."""


def _copy(state: StateDict) -> StateDict:
    return {key: value.clone() for key, value in state.items()}


@ATTACKS.register("non_finite")
def non_finite(state: StateDict, reference: StateDict, num_examples: int,
               rng: np.random.Generator) -> tuple[StateDict, float]:
    """One value of one tensor becomes NaN, another inf (what a diverged client sends)."""
    out = _copy(state)
    key = sorted(out)[int(rng.integers(len(out)))]
    flat = out[key].view(-1)
    flat[int(rng.integers(flat.numel()))] = math.nan
    flat[int(rng.integers(flat.numel()))] = math.inf
    return out, float(num_examples)


@ATTACKS.register("huge_norm")
def huge_norm(state: StateDict, reference: StateDict, num_examples: int,
              rng: np.random.Generator) -> tuple[StateDict, float]:
    """A finite update far from everyone else's: the honest delta reversed and scaled by ``HUGE_SCALE``."""
    return {key: (ref - HUGE_SCALE * (state[key] - ref)).to(ref.dtype) for key, ref in reference.items()}, float(
        num_examples
    )


@ATTACKS.register("wrong_shape")
def wrong_shape(state: StateDict, reference: StateDict, num_examples: int,
                rng: np.random.Generator) -> tuple[StateDict, float]:
    """One tensor gains a trailing element (flattened), so its shape matches nothing on the server."""
    out = _copy(state)
    key = sorted(out)[int(rng.integers(len(out)))]
    out[key] = torch.cat([out[key].reshape(-1), out[key].reshape(-1)[:1]])
    return out, float(num_examples)


@ATTACKS.register("missing_key")
def missing_key(state: StateDict, reference: StateDict, num_examples: int,
                rng: np.random.Generator) -> tuple[StateDict, float]:
    """One tensor is left out of the reply."""
    out = _copy(state)
    del out[sorted(out)[int(rng.integers(len(out)))]]
    return out, float(num_examples)


def _claiming(count: float, doc: str) -> Attack:
    """An attack that sends its own (honest, local, skewed) update and claims ``count`` examples."""

    def claim(state: StateDict, reference: StateDict, num_examples: int,
              rng: np.random.Generator) -> tuple[StateDict, float]:
        return _copy(state), count

    claim.__doc__ = doc
    return claim


for _name, _count, _doc in (
    ("inflated_count", INFLATED_COUNT, "An honest update claimed to come from ``INFLATED_COUNT`` examples."),
    ("nan_count", math.nan, "An honest update with a NaN example count."),
    ("inf_count", math.inf, "An honest update with an infinite example count."),
    ("negative_count", NEGATIVE_COUNT, "An honest update with a negative example count."),
):
    ATTACKS.register(_name)(_claiming(_count, _doc))


@ATTACKS.register("noise")
def noise(state: StateDict, reference: StateDict, num_examples: int,
          rng: np.random.Generator) -> tuple[StateDict, float]:
    """The honest state plus large Gaussian noise on every value (a broken or random-guessing client)."""
    out = {}
    for key in sorted(state):
        value = state[key]
        draw = torch.from_numpy(rng.normal(0.0, NOISE_STD, size=tuple(value.shape)))
        out[key] = (value.to(torch.float64) + draw).to(value.dtype)
    return out, float(num_examples)


SINGLE = tuple(ATTACKS.names())
"""Every single attack, in name order (``mix`` picks among these)."""


@ATTACKS.register("mix")
def mix(state: StateDict, reference: StateDict, num_examples: int,
        rng: np.random.Generator) -> tuple[StateDict, float]:
    """Each call picks one of the single attacks uniformly."""
    return ATTACKS.get(SINGLE[int(rng.integers(len(SINGLE)))])(state, reference, num_examples, rng)


@dataclass
class AttackConfig:
    """Byzantine clients in a simulation (YAML ``simulation.attack`` / ``simulation.attack_fraction``).

    ``name``: an attack from :data:`ATTACKS`, or ``none``. ``fraction``: the share of partition ids that are
    byzantine, chosen once from the run's seed; each of them attacks in every round it is sampled.
    """

    name: str = "none"
    fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.name != "none" and self.name not in ATTACKS:
            raise ValueError(f"simulation.attack must be none or one of {', '.join(ATTACKS.names())}, "
                             f"got {self.name!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"simulation.attack_fraction must be in [0, 1], got {self.fraction}")


"""How a simulation tells its ClientApp workers (Ray processes started after it is set) the attack to run."""


def to_env(config: AttackConfig) -> str:
    return json.dumps(asdict(config))


def from_env(environ: Mapping[str, str]) -> AttackConfig:
    """The simulation's attack, or ``none`` when the variable is unset (every real deployment)."""
    raw = environ.get(ATTACK_ENV)
    return AttackConfig(**json.loads(raw)) if raw else AttackConfig()


def byzantine_clients(clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The partition ids that misbehave: ``round(fraction * clients)`` of them, fixed by ``seed``."""
    count = round(fraction * clients)
    rng = np.random.default_rng([seed, 0xB12])
    return frozenset(int(i) for i in rng.choice(clients, size=count, replace=False))


def attack_rng(seed: int, round: int, client: int) -> np.random.Generator:
    """The generator one byzantine client uses in one round: the same run, the same corruption."""
    return np.random.default_rng([seed, 0xB12, round, client])


def corrupt_reply(reply: TrainReply, request: TrainRequest, client: int, config: AttackConfig) -> TrainReply:
    """A simulated client's reply as it leaves the client: :func:`corrupt` applied to an ``ok`` reply.

    The count goes out as an int when it is a whole number and as the float it became otherwise (NaN, inf):
    the reply is encoded and decoded by the real protocol, which must refuse what it cannot accept.
    """
    if reply.status is not Status.OK or reply.state is None or config.name == "none":
        return reply
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in reply.state.items()}
    reference = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in request.state.items()}
    sent, count = corrupt(config, clients=request.clients, client=client, seed=request.seed, round=request.round,
                          state=state, reference=reference, num_examples=reply.num_examples)
    number: int | float = int(count) if math.isfinite(count) and count.is_integer() else count
    return replace(reply, state={k: v.numpy() for k, v in sent.items()}, num_examples=number)  # type: ignore[arg-type]


def corrupt(config: AttackConfig, *, clients: int, client: int, seed: int, round: int, state: StateDict,
            reference: StateDict, num_examples: int) -> tuple[StateDict, float]:
    """What simulated client ``client`` sends: its honest reply, or the attack's when it is byzantine."""
    if config.name == "none" or client not in byzantine_clients(clients, config.fraction, seed):
        return state, float(num_examples)  # an honest client
    return ATTACKS.get(config.name)(state, reference, num_examples, attack_rng(seed, round, client))
