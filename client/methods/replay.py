"""Experience replay (and the memory options der shares)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from client.methods.base import Method
from client.methods.boundary import TaskBoundary
from client.methods.terms import OwnClassesOnly
from client.replay import POLICIES, make_buffer, merge
from common.errors import FedtideError
from common.method_registry import register_method
from common.seeding import derive_seed
from common.settings import Setting
from common.transforms import random_shifts

SHIFT_STREAM = 1  # derive_seed(seed, SHIFT_STREAM): the replay shifts' random stream
STAGE_STREAM = 2  # derive_seed(seed, STAGE_STREAM): the stage's (memory-fill boundary)
DEFAULT_MEMORY_SIZE = 200

MEMORY_SETTINGS = (
    Setting("memory-size", int, DEFAULT_MEMORY_SIZE, "replay memory per client, in samples (replay and der)",
            minimum=1, maximum=10_000_000, zero_means_default=True),
    Setting("replay-ratio", float, 1.0, "remembered samples mixed into each batch, per new sample", minimum=0, above=True),
    Setting("replay-loss", str, "ce", "ce (plain experience replay) or ace (ER-ACE: new samples compete only among "
            "their own classes)", choices=("ce", "ace")),
    Setting("memory-policy", str, "class-balanced", "which samples the memory keeps: class-balanced (each class "
            "seen an equal share, a uniform sample within it) or reservoir (a uniform sample of the stream)",
            choices=tuple(POLICIES)),
    Setting("memory-fill", str, "boundary", "when new samples join the memory: boundary (kept aside until the client "
            "sees its task end: labels it never had, or a drift its detector found; a new task then trains against "
            "memories of the old ones only) or stream (replayed from the next batch on)", choices=("boundary", "stream")),
    Setting("replay-shift", int, 0, "move each replayed image by a fresh random offset of up to N pixels (0: off); "
            "images only", minimum=0),
)


def check_memory_options(options: dict, context: dict) -> None:
    if options["replay-shift"] and context["scenario"] == "domain-incremental" and context["domain_transform"] == "permutation":
        raise FedtideError(
            "--replay-shift moves pixels to their neighbours' places, which means nothing once the "
            "pixels are permuted: drop --replay-shift for permuted tasks"
        )


@register_method
class Replay(Method):
    """Experience replay: each batch of new data is joined by ``ratio`` times as many
    remembered samples, drawn uniformly from the memory (``client.replay``: ``policy``
    decides which samples it keeps).

    With ``fill`` "boundary" the samples of the task running now are kept aside, in a stage
    of the same capacity, and join the memory only when the client sees the task end: new
    samples with a label it never had, or a drift its detector found (``start_data``; never
    the scenario's task ids). A new task then trains against memories of the old tasks only,
    half of every batch, so the shared head keeps its old classes; with "stream" a task's
    own samples take a growing share of the replayed half as soon as they arrive. A client
    holds up to twice ``capacity`` samples then: the memory and the stage. On the first task
    there is nothing to replay yet.

    With ``shift`` > 0 each replayed image is moved by a fresh random offset of up to that
    many pixels (independent buffer augmentation, Buzzega et al., ICPR 2020): a memory
    replayed a hundred times is then not the same hundred times, so the model learns the
    task from it rather than the memory itself. The new data is left as it is.
    """

    name = "replay"
    vectorized = True
    order = 10  # where its hooks run among the methods'
    settings = MEMORY_SETTINGS
    keeps_memory = True

    @classmethod
    def check(cls, parts, options, context):
        check_memory_options(options, context)

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["memory-size"], seed, options["replay-ratio"], options["replay-loss"] == "ace",
                   options["replay-shift"], options["memory-policy"], options["memory-fill"])

    def __init__(self, capacity: int, seed: int, ratio: float = 1.0, asymmetric: bool = False, shift: int = 0,
                 policy: str = "class-balanced", fill: str = "boundary") -> None:
        self.buffer = make_buffer(policy, capacity, seed)
        # the stage's draws have their own stream: filling it never moves the memory's replay draws
        self.stage = make_buffer(policy, capacity, derive_seed(seed, STAGE_STREAM)) if fill == "boundary" else None
        self.boundary = TaskBoundary()
        self.moved_on_load: list[int] = []  # memory slots the stage's samples took on restore (der relabels them)
        self.ratio = ratio
        self.asymmetric = asymmetric
        self.shift = shift
        # shifts have their own stream, so turning them on changes how memories look, not which
        # samples the reservoir keeps or replays
        self.shift_generator = torch.Generator().manual_seed(derive_seed(seed, SHIFT_STREAM))
        self._drawn: torch.Tensor | None = None  # buffer slots replayed in the current batch
        self._poisson: tuple[float, torch.Generator, torch.Tensor | None] | None = None  # DP-SGD's draws

    def classification_loss(self, logits, y, num_new):
        """ER-ACE (Caccia et al., ICLR 2022): new samples compete only among the classes of
        the incoming batch, so learning them does not push down old classes' logits;
        remembered samples use the full cross-entropy."""
        if not self.asymmetric or num_new == logits.shape[0]:
            return None
        new_logits, new_y = logits[:num_new], y[:num_new]
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[new_y] = True
        masked = new_logits.masked_fill(~present, torch.finfo(logits.dtype).min)
        new_loss = F.cross_entropy(masked, new_y, reduction="sum")
        old_loss = F.cross_entropy(logits[num_new:], y[num_new:], reduction="sum")
        return (new_loss + old_loss) / logits.shape[0]

    def batch_terms(self, batch_size, num_new):
        return [OwnClassesOnly(num_new)] if self.asymmetric and num_new < batch_size else []

    def extend_batch(self, x, y):
        """The batch, then the replayed memories (the tail of the returned batch)."""
        if len(self.buffer) == 0:
            self._drawn = None
            return x, y
        if self._poisson is not None:
            rate, generator, allowed = self._poisson
            drawn = torch.rand(len(self.buffer), generator=generator) < rate
            slots = (drawn & allowed if allowed is not None else drawn).nonzero().flatten()
            if len(slots) == 0:
                self._drawn = None
                return x, y
        else:
            slots = self.buffer.sample_slots(max(1, round(x.shape[0] * self.ratio)))
        self._drawn = slots
        assert self.buffer.x is not None and self.buffer.y is not None
        old_x = random_shifts(self.buffer.x[slots], self.shift, self.shift_generator)
        return torch.cat([x, old_x.to(x.device)]), torch.cat([y, self.buffer.y[slots].to(y.device)])

    def draw_poisson(self, rate: float | None, generator: torch.Generator | None = None,
                     allowed: torch.Tensor | None = None) -> None:
        """DP-SGD (``client.dp_sgd``): each memory joins a batch on its own with probability
        ``rate`` (Poisson sampling, what the privacy accountant models; never twice in one
        batch), instead of a fixed number drawn with replacement; only the slots ``allowed``
        (a bool mask; None: all). None: back to those draws."""
        self._poisson = None if rate is None or generator is None else (rate, generator, allowed)

    def memory_size(self) -> int:
        """The memories a batch may draw from (the stage is not replayed)."""
        return len(self.buffer)

    def memory_samples(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The memories a batch may draw from, by slot (None when there are none)."""
        if len(self.buffer) == 0 or self.buffer.x is None or self.buffer.y is None:
            return None
        return self.buffer.x[: len(self.buffer)], self.buffer.y[: len(self.buffer)]

    def start_data(self, model, data, drifted):
        if self.boundary.see(data.y, drifted) and self.stage is not None:
            self.end_stage(model)

    def end_stage(self, model) -> list[int]:  # noqa: ARG002 - der labels the moved samples with it
        """The task's samples kept aside join the memory; the memory slots written."""
        assert self.stage is not None
        return merge(self.buffer, self.stage)

    def observe(self, x, y):
        (self.buffer if self.stage is None else self.stage).add(x, y)

    def all_samples(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every sample the client keeps, memory and stage (None when there is none)."""
        parts = [b.samples() for b in (self.buffer, self.stage) if b is not None and len(b)]
        if not parts:
            return None
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def state(self):
        out = {**self.buffer.state(), "shift_rng": self.shift_generator.get_state()}
        if self.stage is not None:
            out.update({f"stage.{k}": v for k, v in self.stage.state().items()})
        return {**out, **self.boundary.state()}

    def load_state(self, state, device):
        own = {k: v for k, v in state.items() if not k.startswith("stage.")}
        self.buffer.load_state(own)  # the memory stays on the CPU; batches move
        if "shift_rng" in state:
            self.shift_generator.set_state(state["shift_rng"])
        staged = {k[len("stage."):]: v for k, v in state.items() if k.startswith("stage.")}
        self.moved_on_load = []
        if staged and self.stage is not None:
            self.stage.load_state(staged)
        elif staged:  # the fill went from boundary to stream between runs: the kept-aside samples join now
            aside = make_buffer(self.buffer.policy, self.buffer.capacity, 0)
            aside.load_state(staged)
            self.moved_on_load = merge(self.buffer, aside)
        self.boundary.load_state(state)
