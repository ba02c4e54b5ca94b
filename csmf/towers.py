"""The owned two-tower model (forward only; training lives in ``trainer/``;
docs/design.md#owned-units-and-why-one-search-is-exact).

Every *unit* — each output neuron of an :class:`OwnedLinear` and each column of an
:class:`OwnedEmbedding` — carries an ``owner`` (uint8 buffer): the index of the objective in the
cascade that trained it. A connection from input unit ``b`` to unit ``a`` exists only if
``owner(b) <= owner(a)``. Hence in ``view(t)`` — the network restricted to parameters with owner
``<= t`` — every unit with owner ``<= t`` has exactly its full-network value and every other unit
is 0, so the objective-``t`` score is a partial dot product over the output dims owned ``<= t``:

    s_t(u, i) = sum_{j : owner(j) <= t} e_j v_j

No cross-unit normalisation anywhere (it would couple units of different owners), and activations
must satisfy act(0) = 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csmf.errors import ConfigError, FeatureError, OwnershipError
from csmf.features import TowerSpec

ACTIVATIONS = {"relu": F.relu, "silu": F.silu}  # both satisfy act(0) = 0
Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of both towers; stored in every checkpoint and bundle."""

    out_dim: int = field(default=64, metadata={"help": "output dims m shared by all objectives"})
    hidden: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "hidden layer widths; () = linear towers, what configs/ml-100k.toml ships "
            "(chosen on validation); the synthetic configs use (256, 128)"
        },
    )
    activation: str = field(default="relu", metadata={"help": "relu or silu (act(0) must be 0)"})
    num_objectives: int = field(default=3, metadata={"help": "length of the cascade"})
    init_std: float = field(default=0.05, metadata={"help": "std of embedding initialisation"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.out_dim < 1 or any(h < 1 for h in self.hidden):
            raise ConfigError(
                f"model dims must be >= 1, got out_dim={self.out_dim}, hidden={self.hidden}"
            )
        if not 1 <= self.num_objectives <= 255:
            raise ConfigError(
                f"model.num_objectives must be in [1, 255], got {self.num_objectives}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class OwnedEmbedding(nn.Module):
    """An embedding table whose columns are units. Pools multi-valued inputs by a masked mean."""

    def __init__(self, num: int, dim: int, init_std: float = 0.05) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim).mul_(init_std))  # in place: 1 table, not 2
        with torch.no_grad():
            self.weight[0].zero_()  # row 0 is padding
        self.register_buffer("owner", torch.zeros(dim, dtype=torch.uint8))
        # Row-wise training (trainer.ownership): backward yields a sparse gradient holding only
        # the rows a batch looked up, so the optimizer's cost does not grow with the table.
        self.sparse_grad = False

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, idx: Tensor) -> Tensor:
        """(B,) → (B, D); (B, L) → (B, D) as the mean over non-padding (idx > 0) slots."""
        if idx.numel():  # torch's own message ("index out of range in self") names no table
            lo, hi, rows = int(idx.min()), int(idx.max()), self.weight.shape[0]
            if lo < 0 or hi >= rows:
                raise FeatureError(
                    f"embedding row {hi if hi >= rows else lo} is outside the table of {rows:,} "
                    "rows (an id encoded with another vocabulary?)"
                )
        if idx.dim() == 1:
            return F.embedding(idx, self.weight, sparse=self.sparse_grad)
        # One fused kernel instead of gathering (B, L, D): 2-5x faster at L = 100-500 on CPU.
        # Padding contributes nothing and receives no gradient; an all-padding row pools to 0.
        return F.embedding_bag(
            idx, self.weight, mode="mean", padding_idx=0, sparse=self.sparse_grad
        )  # (B, D)

    def importance(self) -> Tensor:
        """L1 norm of each column's incoming weights (the table entries), (D,); computed without
        an |weight| copy of the table."""
        return torch.linalg.vector_norm(self.weight.detach(), ord=1, dim=0)

    def trainable_mask(self, stage: int) -> dict[str, Tensor]:
        """(1, D): a column trains iff its owner is ``stage``; broadcasts over the rows, so a
        10M-row table needs no (rows, D) mask."""
        return {"weight": (self.owner == stage).unsqueeze(0)}


class OwnedLinear(nn.Module):
    """A Linear layer whose output neurons are units with owners; ``in_owner`` mirrors the owners
    of the layer below. Disallowed connections are multiplied by 0 in the forward pass, so they
    contribute nothing and receive no gradient."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("owner", torch.zeros(out_features, dtype=torch.uint8))
        self.register_buffer("in_owner", torch.zeros(in_features, dtype=torch.uint8))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def connection_mask(self) -> Tensor:
        """(out, in) bool: connection b → a exists iff owner(b) <= owner(a)."""
        return self.in_owner.unsqueeze(0) <= self.owner.unsqueeze(1)

    def forward(self, x: Tensor, max_owner: int | None = None) -> Tensor:
        w = self.weight * self.connection_mask()
        b = self.bias
        if max_owner is not None:  # view(t): drop every parameter owned by a later objective
            live = self.owner <= max_owner
            w = w * live.unsqueeze(1) * (self.in_owner <= max_owner).unsqueeze(0)
            b = b * live
        return F.linear(x, w, b)

    def importance(self) -> Tensor:
        """L1 norm of each unit's live incoming weights, (out,)."""
        return (self.weight.detach() * self.connection_mask()).abs().sum(1)

    def trainable_mask(self, stage: int) -> dict[str, Tensor]:
        mine = self.owner == stage
        return {"weight": mine.unsqueeze(1) & self.connection_mask(), "bias": mine}

    def zero_disallowed(self) -> None:
        """Make disallowed connections exactly 0 in storage too (exported weights need no mask)."""
        with torch.no_grad():
            self.weight.mul_(self.connection_mask())


def table_key(input_name: str) -> str:
    """ModuleDict keys may not contain ':' or '.'; input names look like 'cat:gender'."""
    return input_name.replace(":", "__").replace(".", "_")


class Tower(nn.Module):
    """Embeddings (+ numeric inputs) → MLP → (B, out_dim).

    ``sizes`` maps input names ("id", "cat:<f>", "multi:<f>") to embedding-table rows;
    ``history_size`` is the item-vocabulary size for the user-side history table (or None).
    """

    def __init__(
        self,
        spec: TowerSpec,
        sizes: Mapping[str, int],
        cfg: ModelConfig,
        history_size: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.inputs: list[str] = ["id"]  # order of the concatenated embedding block
        dims = {"id": spec.id_dim}
        for f in spec.fields:
            if f.kind == "categorical":
                name = f"cat:{f.name}"
            elif f.kind == "multi_hot":
                name = f"multi:{f.name}"
            else:
                continue
            self.inputs.append(name)
            dims[name] = f.dim
        if spec.history is not None:
            if history_size is None:
                raise ConfigError("a tower with history needs history_size (item vocabulary size)")
            self.inputs.append("history")
            dims["history"] = spec.history.dim
            sizes = {**sizes, "history": history_size}
        missing = [n for n in self.inputs if n not in sizes]
        if missing:
            raise ConfigError(f"no vocabulary size for tower inputs {missing}")
        self.tables = nn.ModuleDict(
            {
                table_key(n): OwnedEmbedding(int(sizes[n]), dims[n], cfg.init_std)
                for n in self.inputs
            }
        )
        self.num_numeric = len(spec.of_kind("numeric"))
        widths = [sum(dims.values()) + self.num_numeric, *cfg.hidden, cfg.out_dim]
        self.layers = nn.ModuleList(
            OwnedLinear(a, b) for a, b in zip(widths, widths[1:], strict=False)
        )
        self.act = ACTIVATIONS[cfg.activation]
        self.sync_owners()

    def table(self, name: str) -> OwnedEmbedding:
        return self.tables[table_key(name)]

    def input_owner(self) -> Tensor:
        """Owners of the MLP's input units; numeric features are raw inputs, visible to all."""
        parts = [self.table(n).owner for n in self.inputs]
        parts.append(torch.zeros(self.num_numeric, dtype=torch.uint8, device=parts[0].device))
        return torch.cat(parts)

    def sync_owners(self) -> None:
        """Propagate owners upward: each layer's in_owner = owners of the layer below."""
        below = self.input_owner()
        for layer in self.layers:
            layer.in_owner.copy_(below)
            below = layer.owner

    def embed(self, batch: Batch, max_owner: int | None = None) -> Tensor:
        parts = []
        for n in self.inputs:
            t = self.table(n)
            x = t(batch[n])  # (B, D_n)
            if max_owner is not None:
                x = x * (t.owner <= max_owner)
            parts.append(x)
        if self.num_numeric:
            parts.append(batch["num"].to(parts[0].dtype))
        return torch.cat(parts, dim=1)  # (B, in_dim)

    def forward(self, batch: Batch, max_owner: int | None = None) -> Tensor:
        x = self.embed(batch, max_owner)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, max_owner)
            if i < last:
                x = self.act(x)
        return x  # (B, out_dim)


@dataclass
class UnitGroup:
    """A layer in the CPP sense: units ranked together. The final layer is one group spanning
    both towers (dimension j must mean the same objective on both sides)."""

    name: str
    modules: list[nn.Module]
    owner: Tensor  # the owner tensor to edit (shared output_owner for the final group)

    def importance(self) -> Tensor:
        return sum(m.importance() for m in self.modules)


class TwoTower(nn.Module):
    """User tower ``f`` and item tower ``g`` with a shared output-dim ownership."""

    def __init__(
        self,
        cfg: ModelConfig,
        user_spec: TowerSpec,
        item_spec: TowerSpec,
        user_sizes: Mapping[str, int],
        item_sizes: Mapping[str, int],
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.user = Tower(user_spec, user_sizes, cfg, history_size=item_sizes["id"])
        self.item = Tower(item_spec, item_sizes, cfg)
        self.register_buffer("output_owner", torch.zeros(cfg.out_dim, dtype=torch.uint8))
        self.sync_owners()

    def sync_owners(self) -> None:
        """Copy the shared output owners into both final layers, then propagate in_owners."""
        for tower in (self.user, self.item):
            tower.layers[-1].owner.copy_(self.output_owner)
            tower.sync_owners()

    def check_owners(self) -> None:
        """Raise if the towers disagree on output ownership or owners exceed the cascade."""
        for tower in (self.user, self.item):
            if not torch.equal(tower.layers[-1].owner, self.output_owner):
                raise OwnershipError("final-layer owners differ between towers and output_owner")
        top = max(int(m.owner.max()) for m in self.owned_modules())
        if top > self.cfg.num_objectives:  # == num_objectives: unowned (freed by the last stage)
            raise OwnershipError(
                f"a unit is owned by objective {top}, cascade has {self.cfg.num_objectives}"
            )

    def unowned_units(self) -> int:
        """Units the last stage freed for an objective added later (owner = num_objectives);
        they are zeroed, so every vector is exactly 0 in the output dims among them."""
        t = self.cfg.num_objectives
        return sum(int((m.owner == t).sum()) for m in self.owned_modules())

    def use_sparse_gradients(self, on: bool = True) -> None:
        """Embedding tables produce row-sparse gradients (training at scale) or dense ones."""
        for m in self.modules():
            if isinstance(m, OwnedEmbedding):
                m.sparse_grad = on

    def owned_modules(self) -> Iterator[nn.Module]:
        return (m for m in self.modules() if isinstance(m, OwnedEmbedding | OwnedLinear))

    def unit_groups(self) -> list[UnitGroup]:
        """Every CPP layer: each embedding table, each hidden layer per tower, the shared output."""
        groups = []
        for side, tower in (("user", self.user), ("item", self.item)):
            for n in tower.inputs:
                t = tower.table(n)
                groups.append(UnitGroup(f"{side}.{n}", [t], t.owner))
            for i, layer in enumerate(tower.layers[:-1]):
                groups.append(UnitGroup(f"{side}.hidden{i}", [layer], layer.owner))
        groups.append(
            UnitGroup("output", [self.user.layers[-1], self.item.layers[-1]], self.output_owner)
        )
        return groups

    def forward(self, user: Batch, item: Batch, view: int | None = None) -> tuple[Tensor, Tensor]:
        return self.user(user, view), self.item(item, view)

    def objective_masks(self) -> Tensor:
        """(T, out_dim) float: row t selects the output dims owned <= t."""
        t = torch.arange(self.cfg.num_objectives, device=self.output_owner.device)
        return (self.output_owner.unsqueeze(0) <= t.unsqueeze(1)).float()

    def objective_scores(self, e: Tensor, v: Tensor) -> Tensor:
        """Per-objective scores s_t for aligned pairs: e, v (B, D) → (B, T)."""
        return (e * v) @ self.objective_masks().T
