"""What the Triton kernels move through memory, counted in the interpreter (DESIGN section 5).

The interpreter performs every tl.load / tl.store through two builder methods; ``Traffic`` wraps them
and records each masked-in access with the program that made it, attributed to the kernel argument
whose tensor holds the address (and to its row and column for (M, N) tensors). Three claims:

- **Bytes.** For every distinct byte signature of ``fusednorm.variant.all_variants()`` (the (M, N)
  tensors each direction reads and writes, with their dtypes), each (M, N) tensor of
  ``Variant.row_tensors`` is read or written exactly once, and the total per element is
  ``Variant.bytes_per_element``; nothing else of size M x N is touched. Per-row statistics are M values,
  the (N,) parameters are read at most once per program (L1/L2 hits on the GPU). The backward's column
  partials are counted: one float32 row per program and column sum (one value for a 0-d scale), read
  back once by ONE reduction launch that writes every parameter gradient in its own dtype.
- **Access order** (rows wider than one block, processed in column chunks): every element read twice is
  read the second time before the program touches any row outside its row group -- its own row when
  the row is one band, a group of ``CHUNKED_GROUP_ROWS`` rows when it is wider (band by band over the
  group, the column sums resumed from the program's partial row) -- so that the re-read hits L2.
- **DRAM bytes implied**: first reads and every write count, re-reads within the row group do not;
  that must equal the byte floor, plus the partials (their per-group read-modify-write stays in L2).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import pytest
import torch

from fusednorm.variant import ScaleKind, Variant, all_variants

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fusednorm.backends import triton_impl  # noqa: E402
from fusednorm.backends.contract import BackwardArgs, ForwardArgs  # noqa: E402
from fusednorm.triton import heuristics  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts bytes in the Triton interpreter (CPU)")
interpreter = pytest.importorskip("triton.runtime.interpreter")

# Kernel argument of each (M, N) tensor of Variant.row_tensors.
ARGUMENT = {"x": "X", "residual": "R", "h": "H", "y": "Y", "dy": "DY", "dh_in": "DH_IN", "dx": "DX", "dresidual": "DR"}
KERNELS = ("_forward_kernel", "_backward_kernel", "_reduce_partials_kernel")
PARTIALS = {"DW_PARTIAL": "DW", "DB_PARTIAL": "DB", "DS_PARTIAL": "DS"}


class Traffic:
    """Every masked-in access of the wrapped kernels' launches, with the program that made it."""

    def __init__(self):
        self.launches: list[dict] = []
        self._accesses: list[tuple] = []

    def _record(self, builder, kind, ptrs, mask):
        addresses = np.broadcast_to(ptrs.data, np.shape(ptrs.data))
        # As booleans: a mask combined from a scalar comparison arrives as integers (fancy indexing otherwise).
        keep = np.broadcast_to(mask.data.astype(bool), addresses.shape)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        self._accesses.append((kind, builder.grid_idx[0], addresses[keep].astype(np.uint64).ravel(), size))

    @contextlib.contextmanager
    def counting(self, monkeypatch):
        builder = interpreter.InterpreterBuilder
        real_load, real_store = builder.create_masked_load, builder.create_masked_store

        def load(builder_self, ptrs, mask, *args):
            self._record(builder_self, "read", ptrs, mask)
            return real_load(builder_self, ptrs, mask, *args)

        def store(builder_self, ptrs, value, mask, *args):
            self._record(builder_self, "written", ptrs, mask)
            return real_store(builder_self, ptrs, value, mask, *args)

        monkeypatch.setattr(builder, "create_masked_load", load)
        monkeypatch.setattr(builder, "create_masked_store", store)
        for name in KERNELS:
            monkeypatch.setattr(triton_impl, name, self._wrap(getattr(triton_impl, name)))
        yield self

    def _wrap(self, kernel):
        traffic = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    traffic._accesses = []
                    kernel[grid](*args, **kwargs)
                    named = dict(zip(kernel.arg_names, args, strict=False))
                    traffic.launches.append(traffic._attribute(kernel.fn.__name__, named, grid[0], kwargs))
                return launch

        return Launcher()

    def _attribute(self, kernel_name, named, programs, constexprs):
        """Per access: the argument, and for 2-D tensors the row and column, of each address."""
        tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
        result = dict(kernel=kernel_name, args=tensors, programs=programs, constexprs=constexprs,
                      read=defaultdict(int), written=defaultdict(int), trace=[])
        for kind, program, addresses, size in self._accesses:
            owner = np.full(addresses.shape, "", dtype=object)
            rows = np.full(addresses.shape, -1, dtype=np.int64)
            cols = np.full(addresses.shape, -1, dtype=np.int64)
            for name, t in tensors.items():
                lo = t.data_ptr()
                inside = (addresses >= lo) & (addresses < lo + t.untyped_storage().nbytes())
                owner[inside] = name
                if t.dim() == 2:
                    offset = (addresses[inside] - lo).astype(np.int64) // t.element_size()
                    rows[inside], cols[inside] = offset // t.stride(0), offset % t.stride(0)
            assert (owner != "").all(), f"{kernel_name}: an access outside every argument"
            for name in set(owner):
                result[kind][name] += int((owner == name).sum()) * size
            result["trace"].append((kind, program, owner, rows, cols))
        return result


def _inputs(variant: Variant, dtype: torch.dtype, m: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype, offset=0.0):
        return (torch.randn(*shape, generator=gen) + offset).to(dt)

    scale = {ScaleKind.VECTOR: torch.rand(n, generator=gen).to(dtype) + 0.5,
             ScaleKind.SCALAR: torch.rand((), generator=gen).to(dtype) + 0.5}.get(variant.scale_kind)
    p = 0.25 if variant.has_dropout else 0.0
    common = dict(weight=randn(n) if variant.has_weight else None, residual_scale=scale,
                  seed=torch.tensor([1234567], dtype=torch.int64) if variant.has_dropout else None,
                  scale_value=0.7 if variant.scale_kind == ScaleKind.CONSTANT else 1.0, dropout_p=p)
    x = randn(m, n, offset=1.0)
    residual = randn(m, n, dt=variant.residual_dtype(dtype)) if variant.has_residual else None
    return x, residual, randn(n) if variant.has_bias else None, common, randn


def run_variant(variant: Variant, dtype: torch.dtype, m: int, n: int) -> None:
    """One forward and one backward of ``variant`` on the triton backend (with dh_in when prenorm)."""
    x, residual, bias, common, randn = _inputs(variant, dtype, m, n)
    out = triton_impl.forward(variant, ForwardArgs(x=x, residual=residual, bias=bias, **common))
    triton_impl.backward(variant, BackwardArgs(
        dy=randn(m, n), mean=out.mean, rstd=out.rstd,
        dh_in=randn(m, n, dt=variant.h_dtype(dtype)) if variant.prenorm else None,
        x=None if variant.store_h else x, h=out.h if variant.store_h else None,
        residual=residual if not variant.store_h or variant.learned_scale else None,
        bias_dtype=dtype if variant.has_bias else None, **common))


def byte_signatures() -> dict[tuple, Variant]:
    """One variant per distinct (M, N) traffic of all_variants(): the row tensors of both directions and
    their dtypes; of each group the variant with the most column sums (then dropout), so that every kind
    of partial is counted."""
    groups: dict[tuple, Variant] = {}
    for v in all_variants():
        names = v.row_tensors("fwd")[0] + v.row_tensors("fwd")[1] + v.row_tensors("bwd")[0] + v.row_tensors("bwd")[1]
        key = (v.row_tensors("fwd"), v.row_tensors("bwd"), tuple(v.itemsize(t, torch.float16) for t in names))
        rank = (heuristics.column_sums(v), v.has_dropout, v.scale_kind == ScaleKind.SCALAR)
        best = groups.get(key)
        if best is None or rank > (heuristics.column_sums(best), best.has_dropout, best.scale_kind == ScaleKind.SCALAR):
            groups[key] = v
    return groups


SIGNATURES = list(byte_signatures().values())


def _per_element(launch, m, n) -> tuple[dict, dict]:
    names = set(ARGUMENT.values())
    return ({k: v / (m * n) for k, v in launch["read"].items() if k in names},
            {k: v / (m * n) for k, v in launch["written"].items() if k in names})


def _expected(variant: Variant, direction: str, dtype) -> tuple[dict, dict]:
    reads, writes = variant.row_tensors(direction)
    return ({ARGUMENT[t]: float(variant.itemsize(t, dtype)) for t in reads},
            {ARGUMENT[t]: float(variant.itemsize(t, dtype)) for t in writes})


def _check_side_traffic(forward, backward, reduce, variant: Variant, m: int, n: int) -> int:
    """Statistics, parameters, partials; returns the partial bytes (written + read back)."""
    for launch in (forward, backward):
        for name in {"MEAN", "RSTD"} & set(launch["args"]):
            size = launch["args"][name].element_size()
            assert launch["written" if launch is forward else "read"].get(name, 0) == m * size, name
        for name in {"W", "B", "S"} & set(launch["args"]):
            t = launch["args"][name]
            assert launch["written"].get(name, 0) == 0
            assert launch["read"].get(name, 0) <= launch["programs"] * t.numel() * t.element_size(), name
    partial_bytes = 0
    programs = backward["programs"]
    for partial, grad in PARTIALS.items():
        if partial not in backward["args"]:
            assert reduce is None or grad not in reduce["args"]
            continue
        per_program = 1 if backward["args"][partial].dim() == 1 else n
        expected = programs * per_program * 4
        assert backward["written"][partial] == expected and backward["read"].get(partial, 0) == 0, partial
        assert reduce["read"][partial] == expected, partial  # read back once, by the one reduction
        out = reduce["args"][grad]
        assert reduce["written"][grad] == out.numel() * out.element_size(), grad  # in the parameter's dtype
        partial_bytes += 2 * expected
    if variant.scale_kind == ScaleKind.SCALAR:
        assert backward["args"]["DS_PARTIAL"].shape == (programs,)  # the program's sum over its columns too
    return partial_bytes


@pytest.mark.parametrize("variant", SIGNATURES, ids=[v.name for v in SIGNATURES])
def test_bytes_per_element_equal_the_variant_floor(variant, monkeypatch):
    m, n, dtype = 40, 64, torch.float16  # tiles of 16 rows x 64 columns: 3 programs, 3 partial rows
    traffic = Traffic()
    with traffic.counting(monkeypatch):
        run_variant(variant, dtype, m, n)
    forward, backward, *rest = traffic.launches
    reduce = rest[0] if rest else None
    assert [launch["kernel"] for launch in traffic.launches] == list(KERNELS[:2 + bool(rest)])
    assert (reduce is not None) == (variant.has_weight or variant.has_bias or variant.learned_scale)
    for launch, direction in ((forward, "fwd"), (backward, "bwd")):
        assert _per_element(launch, m, n) == _expected(variant, direction, dtype), (direction, launch["kernel"])
        read, written = _per_element(launch, m, n)
        assert sum(read.values()) + sum(written.values()) == variant.bytes_per_element(direction, dtype)
    partial_bytes = _check_side_traffic(forward, backward, reduce, variant, m, n)
    assert backward["programs"] == heuristics.launch_config(m, n, backward=True, variant=variant,
                                                            dtype=dtype).num_programs == 3
    # The partials: one float32 row per program and column sum, written once and read once.
    assert partial_bytes == 2 * 4 * 3 * (n * (variant.has_weight + variant.has_bias
                                              + (variant.scale_kind == ScaleKind.VECTOR))
                                         + (variant.scale_kind == ScaleKind.SCALAR))


def _reads_in_order(launch, name):
    """(program, position in the program's access sequence, row, col) of every read of tensor ``name``,
    and the rows each program touched at each position (any (M, N) tensor, read or written)."""
    reads, touched = [], defaultdict(list)
    position = defaultdict(int)
    row_tensors = set(ARGUMENT.values())
    for kind, program, owner, rows, cols in launch["trace"]:
        pos = position[program]
        position[program] += 1
        in_rows = np.isin(owner, list(row_tensors))
        touched[program].append(set(np.unique(rows[in_rows]).tolist()))
        if kind == "read":
            mine = owner == name
            reads += [(program, pos, r, c) for r, c in zip(rows[mine].tolist(), cols[mine].tolist(), strict=True)]
    return reads, touched


def _late_rereads(launch, name, group=lambda row: {row}) -> tuple[int, int]:
    """(re-reads, re-reads after a row outside ``group(row)`` was touched in between) of tensor ``name`` in
    one launch; asserts that no element is read three times, nor by two programs."""
    reads, touched = _reads_in_order(launch, name)
    first: dict[tuple, tuple] = {}
    done: set[tuple] = set()
    rereads = late = 0
    for program, pos, row, col in reads:
        key = (row, col)
        assert key not in done, f"{name}[{row}, {col}] read three times"
        if key not in first:
            first[key] = (program, pos)
            continue
        first_program, first_pos = first.pop(key)
        done.add(key)
        assert first_program == program, f"{name}[{row}, {col}] read by two programs"
        rereads += 1
        between = set().union(set(), *touched[program][first_pos + 1:pos])
        late += bool(between - group(row))
    return rereads, late


CHUNKED = [Variant(has_bias=True), Variant(is_rms=True, has_residual=True, prenorm=True),
           Variant(has_residual=True, scale_kind=ScaleKind.VECTOR, has_bias=True, has_dropout=True),
           Variant(has_residual=True, scale_kind=ScaleKind.SCALAR, prenorm=True, residual_f32=True, h_f32=True)]


@pytest.mark.parametrize("variant", CHUNKED, ids=[v.name for v in CHUNKED])
def test_chunked_rows_reread_within_the_row_group_and_count_dram_bytes(variant, monkeypatch):
    """Rows of several chunks, in one band or in two: the second read of every element follows the first
    with at most the other rows of its group in between (one band: its own row only; two bands: groups of
    ``CHUNKED_GROUP_ROWS`` rows, the later band re-read after the group's sweeps), so the DRAM bytes are
    the floor. Rows of two bands resume each band's column sums from the program's partial row per
    group: read-modify-write that stays in L2, so the DRAM partials are still one row per program and sum.
    (Block cap lowered to 16 columns; one SM's worth of programs: 2 programs of 3 and 2 rows, groups of
    2 rows and a last group of 1.) The control: the same launch under one-row groups shows late re-reads."""
    monkeypatch.setattr(heuristics, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(heuristics, "REFERENCE_SMS", 1)
    dtype, m = torch.bfloat16, 5
    band = 16 * heuristics.launch_config(m, 32, backward=True, variant=variant, dtype=dtype).band_chunks  # one band
    widths = (band - 3, band + 5)
    traffic = Traffic()
    with traffic.counting(monkeypatch):
        for n in widths:
            run_variant(variant, dtype, m, n)
    backwards = [launch for launch in traffic.launches if launch["kernel"] == "_backward_kernel"]
    for n, backward in zip(widths, backwards, strict=True):
        cfg = heuristics.launch_config(m, n, backward=True, variant=variant, dtype=dtype)
        assert cfg.block_n == 16 and cfg.num_chunks > 1 and (cfg.num_bands > 1) == (n > band)
        assert cfg.num_programs == backward["programs"] == 2 and cfg.rows_per_program == 3
        group_rows = heuristics.CHUNKED_GROUP_ROWS if cfg.num_bands > 1 else 1
        assert cfg.group_rows == group_rows == (2 if cfg.num_bands > 1 else 1)

        def group(row, size=group_rows, per_program=cfg.rows_per_program):
            first = row - row % per_program  # the program's first row
            start = first + (row - first) // size * size
            return set(range(start, min(start + size, first + per_program, m)))

        reads, writes = variant.row_tensors("bwd")
        dram = 0.0
        for tensor in reads:
            name, size = ARGUMENT[tensor], variant.itemsize(tensor, dtype)
            rereads, late = _late_rereads(backward, name, group)
            # Read twice: what sweep A needs for the row sums; once: dh_in, and a residual for dscale only.
            twice = tensor in ("dy", "h", "x") or (tensor == "residual" and not variant.store_h)
            assert backward["read"][name] == (2 if twice else 1) * m * n * size, (n, tensor)
            assert rereads == (m * n if twice else 0) and late == 0, (n, tensor, late)
            if twice and cfg.num_bands > 1:  # the control: as one-row groups, a shared group's later band is late
                shared = sum(len(group(row)) > 1 for row in range(m))
                later = n - 16 * cfg.band_chunks  # the columns after the first band
                assert shared == 4 and _late_rereads(backward, name)[1] == shared * later, (n, tensor)
            dram += m * n * size  # first reads only: every re-read is within its row group
        for tensor in writes:
            assert backward["written"][ARGUMENT[tensor]] == m * n * variant.itemsize(tensor, dtype)
            dram += m * n * variant.itemsize(tensor, dtype)
        assert dram / (m * n) == variant.bytes_per_element("bwd", dtype)
        # The partials: per program, each group of a wide row writes the sums' row (and reads it back
        # from the second group on); only the last write reaches DRAM (the reduction reads it once).
        groups = [-(-min(cfg.rows_per_program, m - first) // group_rows) if cfg.num_bands > 1 else 1
                  for first in range(0, m, cfg.rows_per_program)]  # groups per program ([2, 1] with two bands)
        for partial in {"DW_PARTIAL", "DB_PARTIAL", "DS_PARTIAL"} & set(backward["args"]):
            if backward["args"][partial].dim() == 1:  # a 0-d scale: one value per program, once
                assert backward["written"][partial] == 4 * cfg.num_programs and partial not in backward["read"]
                continue
            assert backward["written"][partial] == 4 * n * sum(groups), (n, partial)
            assert backward["read"].get(partial, 0) == 4 * n * (sum(groups) - len(groups)), (n, partial)


@triton.jit
def _reads_twice(X, Y, N, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + cols, mask=cols < N)
    tl.store(Y + cols, x + tl.load(X + cols, mask=cols < N), mask=cols < N)


def test_counter_sees_a_second_read(monkeypatch):
    """The instrument itself: a kernel that reads x twice is counted twice (masked lanes excluded)."""
    traffic = Traffic()
    x, y = torch.randn(10, dtype=torch.float16), torch.empty(10, dtype=torch.float16)
    with traffic.counting(monkeypatch):
        traffic._accesses = []
        _reads_twice[(1,)](x, y, 10, BLOCK=16)
        launch = traffic._attribute("_reads_twice", {"X": x, "Y": y}, 1, {})
    assert launch["read"] == {"X": 40} and launch["written"] == {"Y": 20}
    assert len(launch["trace"]) == 3


def test_access_order_check_sees_a_late_reread():
    """The instrument of the access-order test: a re-read after another row's access is late."""
    owner = np.array(["DY"], dtype=object)
    trace = [("read", 0, owner, np.array([0]), np.array([3])), ("read", 0, owner, np.array([1]), np.array([3])),
             ("read", 0, owner, np.array([0]), np.array([3])), ("read", 0, owner, np.array([1]), np.array([3]))]
    assert _late_rereads(dict(trace=trace), "DY") == (2, 2)
    trace = [trace[0], trace[2], trace[1], trace[3]]
    assert _late_rereads(dict(trace=trace), "DY") == (2, 0)
