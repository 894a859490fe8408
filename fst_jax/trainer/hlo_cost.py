"""FLOPs and bytes of a compiled XLA program, read from its optimized HLO text, with loops counted.

`compiled.cost_analysis()` counts a `while` loop's body once, whatever its trip count: an update that scans 32
micro-batches through 36 scanned layers reports 1/1152 of its matmul FLOPs, and the sampler's decode loop one
step of its thousands. XLA:CPU also multiplies bf16 in float32: it converts every bf16 weight and cache to a
float32 copy first (hoisted out of loops), and its counts include those converts and float32 reads, which a
GPU or TPU does not do. `hlo_cost` walks the optimized module instead:

- a loop whose trip count XLA knows (`known_trip_count`: scans, fori loops) counts its body that many times;
  a loop whose count depends on data (the sampler's decode loop) is returned apart, as the cost of one
  iteration (`step_flops`, `step_bytes`), for the caller to multiply by the steps it expects;
- FLOPs: 2·M·N·K for every dot (also inside fusions, and cuBLAS gemm custom calls), one per element for
  elementwise arithmetic and per reduced element — XLA's conventions, less its converts (0 FLOPs here);
  transcendentals are not counted (XLA counts them apart too);
- bytes: operands read + result written by each top-level instruction (a fusion once, its insides are
  registers), slices of an operand counted as the slice, in-place updates (dynamic-update-slice, scatter) as the update, and float32 values
  that XLA:CPU made from bf16 counted at 2 bytes an element (the convert itself not at all);
- a conditional counts its most expensive branch; other custom calls count 0 FLOPs and are listed in
  `uncounted` (e.g. a fused attention kernel on GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

__all__ = ["HloCost", "hlo_cost"]

_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "opt-barrier", "domain"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare",
                "select", "and", "or", "xor", "not", "clamp", "remainder", "sign", "floor", "ceil",
                "round-nearest-even", "round-nearest-afz", "shift-left", "shift-right-logical",
                "shift-right-arithmetic", "atan2"}
_SLICING = {"dynamic-slice", "slice", "gather"}
_PASS_THROUGH = {"convert", "bitcast", "copy"}
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__onednn$matmul")


@dataclasses.dataclass(frozen=True)
class HloCost:
    """A program's FLOPs and bytes accessed per device: `flops`/`bytes` for everything outside loops of unknown
    trip count, `step_flops`/`step_bytes` for one iteration of those loops (the decode step).
    `uncounted`: custom-call targets whose FLOPs are not known here."""

    flops: float = 0.0
    bytes: float = 0.0
    step_flops: float = 0.0
    step_bytes: float = 0.0
    uncounted: tuple[str, ...] = ()
    xla_flops: float = 0.0   # what compiled.cost_analysis() says, when set (cost_model.program_cost)
    xla_bytes: float = 0.0

    def total(self, steps: float = 0.0) -> tuple[float, float]:
        """(FLOPs, bytes) of one call that runs `steps` iterations of its data-dependent loop."""
        return self.flops + steps * self.step_flops, self.bytes + steps * self.step_bytes

    def __add__(self, other: "HloCost") -> "HloCost":
        return HloCost(self.flops + other.flops, self.bytes + other.bytes, self.step_flops + other.step_flops,
                       self.step_bytes + other.step_bytes, tuple(sorted(set(self.uncounted + other.uncounted))))

    def scaled(self, n: float) -> "HloCost":
        return HloCost(n * self.flops, n * self.bytes, n * self.step_flops, n * self.step_bytes, self.uncounted)


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str          # "f32[4,8]{1,0}" or a tuple "(f32[4], s32[])"
    op: str
    operands: list[str]
    attrs: str
    args: str = ""      # the raw text between the parentheses (a parameter's number)

    @property
    def elements(self) -> int:
        return _elements(self.shape)

    @property
    def nbytes(self) -> int:
        return _shape_bytes(self.shape)

    def called(self, key: str) -> list[str]:
        """The computations named by attribute `key` (calls=, to_apply=, body=, branch_computations={…})."""
        m = re.search(key + r"=(\{[^}]*\}|%[^\s,}]+)", self.attrs)
        return re.findall(r"%([^\s,}]+)", m.group(1)) if m else []


def _shape_bytes(shape: str) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(shape))


def _close(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def _parse_instruction(line: str) -> _Instruction | None:
    body = line.strip().removeprefix("ROOT ")
    if not body.startswith("%") or " = " not in body:
        return None
    name, rest = body[1:].split(" = ", 1)
    if rest.startswith("("):
        end = _close(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op, paren, rest = rest.partition("(")
    if not paren:
        return None
    end = _close("(" + rest, 0) - 1
    args = rest[:end - 1]
    return _Instruction(name, shape, op, re.findall(r"%([^\s,()]+)", args), rest[end:], args)


def _parse_module(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    computations: dict[str, list[_Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif current is not None and line.strip() != "}":
            inst = _parse_instruction(line)
            if inst is not None:
                current.append(inst)
    if not entry:
        raise ValueError("hlo_cost: no ENTRY computation in the text; pass compiled.as_text() of a jax program")
    return computations, entry


def _dot_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
    """2 × output elements × contracted size, for a dot or a gemm custom call."""
    lhs = _ARRAY.search(shapes.get(inst.operands[0], "")) if inst.operands else None
    if lhs is None:
        return 0.0
    dims = [int(d) for d in lhs.group(2).split(",") if d]
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    if m:
        contracting = [int(d) for d in m.group(1).split(",") if d]
    else:  # a gemm custom call states its dimensions in the backend config
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
        contracting = [int(d) for d in json.loads(f"[{m.group(1)}]")] if m else []
    out = _ARRAY.search(inst.shape)
    out_elements = math.prod(int(d) for d in out.group(2).split(",") if d) if out else 0
    return 2.0 * out_elements * math.prod(dims[d] for d in contracting)


class _Walker:
    def __init__(self, hlo_text: str):
        self.computations, self.entry = _parse_module(hlo_text)
        self.upcast_computations = {name for name, insts in self.computations.items() if _is_upcast(insts)}
        self.downcast_computations = {name for name, insts in self.computations.items() if _is_downcast(insts)}
        self._flops: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._costs: dict[tuple[str, frozenset[int]], HloCost] = {}

    def flops(self, name: str) -> tuple[float, tuple[str, ...]]:
        """FLOPs of a fused or called computation (everything inside counted, loops by trip count)."""
        if name not in self._flops:
            self._flops[name] = self._computation_flops(name)
        return self._flops[name]

    def _computation_flops(self, name: str) -> tuple[float, tuple[str, ...]]:
        shapes = {i.name: i.shape for i in self.computations[name]}
        total, uncounted = 0.0, set()
        for inst in self.computations[name]:
            f, u = self._instruction_flops(inst, shapes)
            total += f
            uncounted |= set(u)
        return total, tuple(sorted(uncounted))

    def _instruction_flops(self, inst: _Instruction, shapes) -> tuple[float, tuple[str, ...]]:
        if inst.op == "dot":
            return _dot_flops(inst, shapes), ()
        if inst.op in _ELEMENTWISE:
            return float(inst.elements), ()
        if inst.op in ("reduce", "reduce-window"):
            return float(sum(_elements(shapes.get(o, "")) for o in inst.operands[:len(inst.operands) // 2])), ()
        if inst.op == "custom-call":
            target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
            target = target.group(1) if target else "?"
            return (_dot_flops(inst, shapes), ()) if target in _GEMM_TARGETS else (0.0, (target,))
        if inst.op in ("fusion", "call", "async-start"):
            called = inst.called("calls") or inst.called("to_apply")
            return self.flops(called[0]) if called and called[0] in self.computations else (0.0, ())
        if inst.op == "while":
            trips = _trip_count(inst)
            body = self.flops(inst.called("body")[0])
            return (body[0] * (trips or 1), body[1])
        if inst.op == "conditional":
            branches = [self.flops(b) for b in inst.called("branch_computations")]
            return max(branches, default=(0.0, ()))
        return 0.0, ()

    def cost(self, name: str, upcast_inputs: frozenset[int] = frozenset()) -> HloCost:
        """Cost of a computation run as a sequence of kernels; `upcast_inputs`: indices of its (tuple) parameter
        that are XLA:CPU's float32 copies of bf16 values."""
        key = (name, upcast_inputs)
        if key not in self._costs:
            self._costs[key] = self._computation_cost(name, upcast_inputs)
        return self._costs[key]

    def _computation_cost(self, name: str, upcast_inputs: frozenset[int]) -> HloCost:
        insts = self.computations[name]
        shapes = {i.name: i.shape for i in insts}
        params = {i.name for i in insts if i.op == "parameter"}
        upcast: set[str] = set()
        total = HloCost()
        for inst in insts:
            if inst.op == "get-tuple-element" and inst.operands and inst.operands[0] in params:
                index = re.search(r"index=(\d+)", inst.attrs)
                if index and int(index.group(1)) in upcast_inputs:
                    upcast.add(inst.name)
                continue
            if inst.op in ("bitcast", "copy") and inst.operands and inst.operands[0] in upcast:
                upcast.add(inst.name)
                continue
            if self._is_upcast(inst, shapes):
                upcast.add(inst.name)
                continue
            if inst.operands and inst.operands[0] in upcast and self._is_downcast(inst):
                continue  # back to bf16 after an in-place update in float32 (XLA:CPU): the buffer never moved
            if inst.operands and inst.operands[0] in upcast and (
                    inst.op in _IN_PLACE or (inst.op == "fusion" and _in_place_update(
                        self.computations.get((inst.called("calls") or [""])[0], [])) is not None)):
                upcast.add(inst.name)  # an in-place update of a float32 copy: still that copy (counted as the update)
            if inst.op == "while":
                tuple_in = next((i for i in insts if i.name == inst.operands[0]), None)
                carried = frozenset(k for k, o in enumerate(tuple_in.operands if tuple_in else []) if o in upcast)
                body = self.cost(inst.called("body")[0], carried)
                trips = _trip_count(inst)
                if trips is None:  # a data-dependent loop: its body is one step (a loop of that kind inside it: once)
                    total += HloCost(step_flops=body.flops + body.step_flops, step_bytes=body.bytes + body.step_bytes,
                                     uncounted=body.uncounted)
                else:
                    total += body.scaled(trips)
                continue
            if inst.op == "conditional":
                branches = [self.cost(b) for b in inst.called("branch_computations")]
                total += max(branches, key=lambda c: c.flops + c.bytes, default=HloCost())
                continue
            if inst.op in ("call", "async-start") and inst.called("to_apply") + inst.called("calls"):
                called = (inst.called("calls") or inst.called("to_apply"))[0]
                if called in self.computations:
                    total += self.cost(called)
                continue
            if inst.op in _FREE or inst.op.endswith("-done"):
                continue
            flops, uncounted = self._instruction_flops(inst, shapes)
            total += HloCost(flops=flops, bytes=self._bytes(inst, shapes, upcast), uncounted=uncounted)
        return total

    def _is_upcast(self, inst: _Instruction, shapes) -> bool:
        if not inst.shape.startswith("f32") or not inst.operands:
            return False
        if inst.op == "convert":
            return shapes.get(inst.operands[0], "").startswith("bf16")
        called = inst.called("calls")
        return inst.op == "fusion" and bool(called) and called[0] in self.upcast_computations

    def _is_downcast(self, inst: _Instruction) -> bool:
        if inst.op == "convert":
            return inst.shape.startswith("bf16")
        called = inst.called("calls")
        return inst.op == "fusion" and bool(called) and called[0] in self.downcast_computations

    def _bytes(self, inst: _Instruction, shapes, upcast: set[str]) -> float:
        """Operands read and result written; a slicing fusion reads its slice, an in-place update writes its update."""
        fused = self.computations.get((inst.called("calls") or [""])[0], []) if inst.op == "fusion" else []
        read = 0.0
        for k, operand in enumerate(inst.operands):
            size = _shape_bytes(shapes.get(operand, ""))
            if operand in upcast:
                size /= 2  # XLA:CPU's f32 copy of a bf16 value: an accelerator reads the bf16
            if fused:
                size = _fused_read(fused, k, size)
            elif inst.op in _SLICING and k == 0:
                size = inst.nbytes
            elif inst.op in _IN_PLACE and k == 0:
                size = 0
            read += size
        written = inst.nbytes
        if inst.op == "custom-call" and inst.shape.startswith("("):  # (result, scratch workspace): the result
            first = _ARRAY.search(inst.shape)
            written = _shape_bytes(first.group(0)) if first else 0
        update = _in_place_update(fused) if fused else (inst if inst.op in _IN_PLACE else None)
        if update is not None:  # written in place: only the update (at the buffer's element size)
            src = {i.name: i.shape for i in fused} if fused else shapes
            elements = _elements(src.get(update.operands[_UPDATE_OPERAND[update.op]], ""))
            written = elements * inst.nbytes / max(inst.elements, 1)
        return read + written


def _elements(shape: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape))


def _fused_read(fused: list[_Instruction], k: int, full: float) -> float:
    """Bytes a fusion reads of its k-th operand: the slices it takes when it only slices it, none when it only
    updates it in place (through XLA:CPU's converts: convert → dynamic-update-slice → convert back), else all."""
    param = next((i for i in fused if i.op == "parameter" and i.args.strip() == str(k)), None)
    if param is None:
        return full
    users = [i for i in fused if param.name in i.operands]
    value = param.name
    while len(users) == 1 and users[0].op in _PASS_THROUGH:  # through converts (XLA:CPU's f32 round trips)
        value = users[0].name
        users = [i for i in fused if value in i.operands]
    if users and all(u.op in _SLICING and u.operands[0] == value for u in users):
        # the slices, at the parameter's element size
        return float(sum(u.elements for u in users)) * full / max(_elements(param.shape), 1)
    if users and all(u.op in _IN_PLACE and u.operands[0] == value for u in users):
        return 0.0
    return full


def _in_place_update(fused: list[_Instruction]) -> _Instruction | None:
    """The in-place update (dynamic-update-slice or scatter) a fusion's result is (maybe under converts back to
    the buffer's type)."""
    by_name = {i.name: i for i in fused}
    root = fused[-1] if fused else None
    while root is not None and root.op in _PASS_THROUGH and root.operands:
        root = by_name.get(root.operands[0])
    return (root if root is not None and root.op in _IN_PLACE and len(root.operands) > _UPDATE_OPERAND[root.op]
            else None)


# Ops that write into their first operand's buffer (XLA aliases it): the bytes moved are the update's.
_IN_PLACE = ("dynamic-update-slice", "scatter")
_UPDATE_OPERAND = {"dynamic-update-slice": 1, "scatter": 2}


def _trip_count(inst: _Instruction) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', inst.attrs)
    return int(m.group(1)) if m else None


def _is_cast(insts: list[_Instruction], source: str, target: str) -> bool:
    """A computation whose whole job is a `source` → `target` dtype conversion (maybe with a layout change)."""
    body = [i for i in insts if i.op != "parameter"]
    params = [i for i in insts if i.op == "parameter"]
    return (bool(body) and len(params) == 1 and params[0].shape.startswith(source) and body[-1].shape.startswith(target)
            and any(i.op == "convert" for i in body)
            and all(i.op in ("convert", "bitcast", "copy", "transpose", "reshape") for i in body))


def _is_upcast(insts: list[_Instruction]) -> bool:
    """bf16 → f32: XLA:CPU's convert fusions before it multiplies."""
    return _is_cast(insts, "bf16", "f32")


def _is_downcast(insts: list[_Instruction]) -> bool:
    """f32 → bf16: XLA:CPU's way back after updating a bf16 buffer in f32."""
    return _is_cast(insts, "f32", "bf16")


def hlo_cost(hlo_text: str) -> HloCost:
    """FLOPs and bytes per device of the optimized module `hlo_text` (`compiled.as_text()`), loops counted
    (see the module docstring for what is counted and how)."""
    walker = _Walker(hlo_text)
    return walker.cost(walker.entry)
