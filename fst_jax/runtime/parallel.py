"""Device meshes, logical-axis rules and sharding helpers.

A mesh has three named axes: `data` (pure data parallel), `fsdp` (data parallel with parameters sharded) and
`tensor` (Megatron-style model parallel). Parameters name their dims with *logical* axes (`embed`, `mlp`,
`q_heads`...); a rules table maps each logical axis to mesh axes. Two tables ship: one for training (FSDP
over `embed`) and one for sampling (weights replicated over the batch axes), the two layouts the README's "Meshes and shardings" describes.
Meshes are built with Auto axis types so GSPMD propagates shardings through ordinary NNX code.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

TRAIN_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)
# Sampling reads every weight once per token: keep them whole on each batch shard, split only by `tensor`.
SAMPLE_RULES: Rules = tuple(("embed", None) if name == "embed" else (name, axes) for name, axes in TRAIN_RULES)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve `{data, fsdp, tensor}` sizes (one may be -1 = the rest) against `num_devices`."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    bad = [f"{a}={s}" for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"config.mesh sizes must be positive or -1, got {', '.join(bad)}")
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    described = " × ".join(f"{a}={s}" for a, s in sizes.items())
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh ({described}): the fixed axes use {fixed} devices, which does not "
                             f"divide the {num_devices} available")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"config.mesh ({described}) needs {fixed} devices but {num_devices} are available "
            f"({jax.default_backend()}); change the sizes or set one axis to -1 to take the rest")
    return sizes


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all, across hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config or {"fsdp": -1}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Iterable[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
    """The PartitionSpec the rules give for an array with these logical axes.

    A logical axis absent from the rules is an error; mesh axes of size 1 are dropped; a mesh axis used by two
    dims is an error (a collision in the rules). When `shape` is given and a dim does not divide by its mesh
    axes' size, that dim is replicated instead (logged), e.g. 8 kv heads on a 16-way tensor axis.
    """
    table = dict(rules)
    used: dict[str, str] = {}
    spec = []
    logical_axes = tuple(logical_axes)
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        targets = table[name]
        targets = () if targets is None else (targets,) if isinstance(targets, str) else tuple(targets)
        targets = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1)
        for t in targets:
            if t in used:
                raise ValueError(f"sharding rules collide: logical axes {used[t]!r} and {name!r} of "
                                 f"{logical_axes} both map to mesh axis {t!r}")
            used[t] = name
        size = math.prod(mesh.shape[t] for t in targets)
        if shape is not None and targets and shape[dim] % size:
            log.info("replicating dim %d (%s, size %d) of %s: not divisible by mesh axes %s (size %d)",
                     dim, name, shape[dim], logical_axes, targets, size)
            targets = ()
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A State of NamedShardings, one per parameter, from its `logical_axes` metadata."""
    def one(var):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter of shape {var.shape} has no logical_axes metadata")
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, rules, mesh, var.shape)))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading dim over (data, fsdp), the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_size_multiple(mesh: Mesh) -> int:
    """Batch sizes must be a multiple of this to split evenly over the batch axes."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of host arrays [B, ...] with B split over (data, fsdp).

    Every process passes the same global batch; each builds only the rows its own devices hold (with several
    processes, `make_array_from_callback` asks for exactly this process's shards), so nothing is copied to
    devices of other hosts and the global array is the one a single process would build.
    """
    multiple = batch_size_multiple(mesh)

    def place(x):
        x = np.asarray(x)
        if x.shape[0] % multiple:
            raise ValueError(f"batch dim {x.shape[0]} is not a multiple of the mesh's batch axes "
                             f"(data × fsdp = {multiple}); pad the batch or change config.mesh")
        sharding = batch_sharding(mesh, max(x.ndim, 1))
        if jax.process_count() > 1:
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
        return jax.device_put(x, sharding)

    return jax.tree.map(place, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array's value on the host of every process: gathered across processes when this one does not
    hold all of it (a batch split over several hosts), else read directly."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def reshard(tree: Any, shardings: Any) -> Any:
    """Move a pytree to new shardings (e.g. training layout → sampling layout) in one transfer."""
    return jax.device_put(tree, shardings)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a pytree's arrays are laid out on (the first NamedSharding found; None for plain
    single-device arrays)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def lower_for(jitted: Any, *args, platform: str | None = None, **kwargs) -> Any:
    """`jitted.lower(*args, **kwargs)` for this machine's backend, or, with `platform` ("cuda", "tpu"), for that
    backend without its device (traced, then lowered with `lowering_platforms`): such a program cannot be
    compiled here, but lowering it shows that nothing in it is CPU-only."""
    if platform is None:
        return jitted.lower(*args, **kwargs)
    return jitted.trace(*args, **kwargs).lower(lowering_platforms=(platform,))
