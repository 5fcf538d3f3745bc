"""Experience replay (and the memory options der shares)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from client.methods.base import Method
from client.replay import ReplayBuffer
from common.errors import FedtideError
from common.method_registry import register_method
from common.seeding import derive_seed
from common.settings import Setting
from common.transforms import random_shifts

SHIFT_STREAM = 1  # derive_seed(seed, SHIFT_STREAM): the replay shifts' random stream
DEFAULT_MEMORY_SIZE = 200

MEMORY_SETTINGS = (
    Setting("memory-size", int, DEFAULT_MEMORY_SIZE, "replay memory per client, in samples (replay and der)",
            minimum=1, maximum=10_000_000, zero_means_default=True),
    Setting("replay-ratio", float, 1.0, "remembered samples mixed into each batch, per new sample", minimum=0, above=True),
    Setting("replay-loss", str, "ce", "ce (plain experience replay) or ace (ER-ACE: new samples compete only among "
            "their own classes)", choices=("ce", "ace")),
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
    remembered samples, drawn uniformly from a reservoir of the whole stream.

    With ``shift`` > 0 each replayed image is moved by a fresh random offset of up to that
    many pixels (independent buffer augmentation, Buzzega et al., ICPR 2020): a memory
    replayed a hundred times is then not the same hundred times, so the model learns the
    task from it rather than the memory itself. The new data is left as it is.
    """

    name = "replay"
    order = 10  # where its hooks run among the methods'
    settings = MEMORY_SETTINGS
    keeps_memory = True

    @classmethod
    def check(cls, parts, options, context):
        check_memory_options(options, context)

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["memory-size"], seed, options["replay-ratio"], options["replay-loss"] == "ace",
                   options["replay-shift"])

    def __init__(self, capacity: int, seed: int, ratio: float = 1.0, asymmetric: bool = False, shift: int = 0) -> None:
        self.buffer = ReplayBuffer(capacity, seed)
        self.ratio = ratio
        self.asymmetric = asymmetric
        self.shift = shift
        # shifts have their own stream, so turning them on changes how memories look, not which
        # samples the reservoir keeps or replays
        self.shift_generator = torch.Generator().manual_seed(derive_seed(seed, SHIFT_STREAM))
        self._drawn: torch.Tensor | None = None  # buffer slots replayed in the current batch

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

    def extend_batch(self, x, y):
        """The batch, then the replayed memories (the tail of the returned batch)."""
        if len(self.buffer) == 0:
            self._drawn = None
            return x, y
        slots = self.buffer.sample_slots(max(1, round(x.shape[0] * self.ratio)))
        self._drawn = slots
        assert self.buffer.x is not None and self.buffer.y is not None
        old_x = random_shifts(self.buffer.x[slots], self.shift, self.shift_generator)
        return torch.cat([x, old_x.to(x.device)]), torch.cat([y, self.buffer.y[slots].to(y.device)])

    def observe(self, x, y):
        self.buffer.add(x, y)

    def state(self):
        return {**self.buffer.state(), "shift_rng": self.shift_generator.get_state()}

    def load_state(self, state, device):
        self.buffer.load_state(state)  # the memory stays on the CPU; batches move
        if "shift_rng" in state:
            self.shift_generator.set_state(state["shift_rng"])
