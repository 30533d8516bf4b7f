"""What the GPU kernels compile to for an H100/H200 (sm_90), checked on a machine without a GPU.

For every Triton kernel variant the hot path uses (compiled ahead of time for sm_90) and every
CUDA kernel (nvcc), it reports: 16-byte vector loads vs scalar loads, registers per thread,
spills, resident blocks per SM, FMA contraction and division rounding, and Philox calls per
element. tests/test_gpu_codegen.py asserts the targets from these rows:
- every aligned path loads 16 bytes at a time (ld.global.v4), no scalar loads;
- at least 2 resident blocks per SM for every kernel;
- the task-vector kernel: no fma.rn.f32 (contraction off), div.rn.f32 (no approximate division),
  one Philox call per 4 elements;
- the delta-decode kernels (compressed pools): the CUDA one loads codes and dense terms 16 bytes at a
  time, stores 16 bytes, no local memory; the Triton one (the default on a GPU) loads them 16 bytes at a
  time on its aligned body too, and one scale per row of 64 elements (it had loaded every element and
  its scale on its own: 48 scalar loads per thread and block);
- the "sm_80" rows (A100, a default build target): every Triton kernel compiles for it. Triton has no
  float8_e4m3fn (tl.float8e4nv) below sm_89, so the kernels build that load only when an input is one
  (HAS_E4M3) and such calls go to the CUDA extension there; the mixed-dtype rows below are the variants
  without it, which failed to compile for sm_80 while the load was always built. A row that does not
  compile carries its "error" instead of the counts.

    python benchmarks/gpu_codegen.py [--json]      (needs triton; nvcc for the CUDA rows)
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32  # sm_90 and sm_80 alike
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}


def blocks_per_sm(regs: int, threads: int, shared: int = 0, arch: int = 90) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256) and warps."""
    warps = (threads + 31) // 32
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // max(per_warp * warps, 1)
    by_smem = SMEM_PER_SM[arch] // shared if shared else MAX_BLOCKS_PER_SM
    return min(by_regs, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM, by_smem)


def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def ptx_facts(ptx: str) -> dict:
    loads = re.findall(r"ld\.global(?:\.nc)?(?:\.L1::\w+)?(?:\.L2::\w+)?\.(v\d\.)?(\w+)", ptx)
    return {"v4_loads": sum(1 for v, _ in loads if v == "v4."),
            "v2_loads": sum(1 for v, _ in loads if v == "v2."),
            "scalar_loads": sum(1 for v, t in loads if not v and t in ("b16", "b8", "u16", "u8")),
            "scalar_b32_loads": sum(1 for v, t in loads if not v and t in ("b32", "u32")),
            "local_ops": len(re.findall(r"\b(?:ld|st)\.local\b", ptx)),
            "fma_f32": len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx)),
            "div_rn_f32": len(re.findall(r"\bdiv\.rn(?:\.ftz)?\.f32\b", ptx)),
            "div_approx_f32": len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", ptx)),
            "mul_hi_u32": len(re.findall(r"\bmul\.hi\.u32\b", ptx)),
            "neg_zero_consts": ptx.count("0f80000000"),  # -0.0: the weighted sums' accumulator start
            "ftz_ops": len(re.findall(r"\.ftz\b", ptx))}  # flush-to-zero: subnormals would differ from the CPU


def cubin_regs(cubin: bytes) -> dict:
    """Registers and spills of a cubin Triton built with its own ptxas (cuobjdump --dump-resource-usage)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        r = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode:
        raise RuntimeError(r.stderr.strip())
    return {"registers": int(re.search(r"REG:(\d+)", r.stdout).group(1)),
            "spill_bytes": int(re.search(r"LOCAL:(\d+)", r.stdout).group(1))}


def loop_starts(ttir: str) -> str:
    """The constant lower bounds of the kernel's scf.for loops, in order ("1 0"): a bound written as a constexpr
    bool compiled to -1 (the interpreter, Python's range, reads True as 1)."""
    loops = re.findall(r"scf\.for %\S+ = (%\S+)", ttir)
    # a bound that is no constant is named as it is (the test then sees it: no loop goes unchecked)
    return " ".join(m.group(1) if (m := re.fullmatch(r"%c(-?\d+)(?:_i\d+)?", b)) else b for b in loops)


def triton_row(name, fn, signature, constexprs, divisible, num_warps, fp_fusion=True, elems=None, arch=90):
    """One kernel variant compiled for sm_`arch`; for sm_80 a compile error becomes the row's "error"
    (for sm_90 it stops the script: every row there must compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}  # a kernel from before HAS_E4M3 too
    types = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature={a: types[a] for a in fn.arg_names}, constexprs=constexprs, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion})
    except Exception as e:
        if arch == 90:
            raise
        while (e.__cause__ or e.__context__) is not None:  # Triton nests one error per inlined call: the innermost
            e = e.__cause__ or e.__context__
        why = [line.strip() for line in str(e).splitlines() if line.strip()]
        return {"kernel": name, "backend": "triton", "arch": arch, "threads": 32 * num_warps,
                "error": why[-1] if why else type(e).__name__}
    ptx = k.asm["ptx"]
    row = {"kernel": name, "backend": "triton", "arch": arch, "threads": 32 * num_warps, **ptx_facts(ptx),
           **cubin_regs(k.asm["cubin"]), "loop_starts": loop_starts(k.asm["ttir"])}
    row["blocks_per_sm"] = blocks_per_sm(row["registers"], row["threads"], k.metadata.shared, arch)
    if elems:
        row["elems_per_thread"] = elems // row["threads"]
    return row


def triton_rows() -> list:
    sys.path.insert(0, ROOT)
    import triton  # noqa: F401
    from pymerge.kernels import task_vectors as tv
    from pymerge.kernels import weighted_sum as ws
    rows = []
    ws_sig = {"addr_table": "*i64", "code_table": "*i32", "w_table": "*fp32", "out0": "*bf16", "out1": "*bf16",
              "out2": "*bf16", "out3": "*bf16", "start": "i64", "end": "i64", "n_in": "i32"}
    ptrs = ["addr_table", "code_table", "w_table", "out0", "out1", "out2", "out3"]
    # mixed: every dtype among the inputs, float8_e4m3fn too (HAS_E4M3: the widest variant)
    for dt_name, dt in (("bf16", 2), ("fp32", 0), ("mixed", -1)):
        for k in (1, 4):
            rows.append(triton_row(f"weighted_sum {dt_name} K={k}", ws._weighted_sum_kernel, ws_sig,
                                   {"IN_DT": dt, "K": k, "BLOCK": 4096, "ALIGNED": True, "HAS_E4M3": dt == -1,
                                    "DELTA": False}, ptrs + ["start", "end"], num_warps=8, elems=4096))
    # task_arithmetic's delta form (a base held in registers beside the sums)
    for k in (1, 4):
        rows.append(triton_row(f"weighted_sum bf16 K={k} delta", ws._weighted_sum_kernel, ws_sig,
                               {"IN_DT": 2, "K": k, "BLOCK": 4096, "ALIGNED": True, "HAS_E4M3": False, "DELTA": True},
                               ptrs + ["start", "end"], num_warps=8, elems=4096))
    # the pool's hot path on a GPU: a whole model's weighted sums in one launch (full blocks; the
    # partial last block of each tensor goes in a second, masked launch)
    from pymerge.kernels import weighted_sum_grouped as wg
    import triton.language as tl
    wg_sig = {"blk_tensor": "*i32", "blk_start": "*i64", "in_addr": "*i64", "in_code": "*i32", "out_addr": "*i64",
              "numels": "*i64", "groups": "*i32", "weights": "*fp32", "n_in": "i32", "k_total": "i32", "first": "i32"}
    for dt_name, dt in (("bf16", 2), ("fp32", 0), ("mixed", -1)):
        for k in (1, 4):
            rows.append(triton_row(f"grouped weighted_sum {dt_name} K={k} full blocks", wg._grouped_kernel, wg_sig,
                                   {"IN_DT": dt, "OUT_T": tl.bfloat16, "K": k, "BLOCK": 1024, "FULL": True,
                                    "ALIGNED": True, "HAS_E4M3": dt == -1},
                                   [a for a, t in wg_sig.items() if t.startswith("*")],
                                   num_warps=4, elems=1024))
    tv_sig = {"tab": "*i64", "out_ptr": "*bf16", "start": "i64", "end": "i64", "n_models": "i32", "lam": "fp32",
              "divisor": "fp32"}
    for consensus in (False, True):
        for grouped in (True, False):
            rows.append(triton_row(
                f"task_vectors bf16 consensus={int(consensus)} grouped={int(grouped)}", tv._tv_merge_kernel, tv_sig,
                {"IN_DT": 2, "BASE_DT": 2, "CONSENSUS": consensus, "NORMALIZE": True, "GROUPED": grouped,
                 "ALIGNED": True, "BLOCK": 1024, "HAS_E4M3": False}, ["tab", "out_ptr", "start", "end"], num_warps=4,
                fp_fusion=False,
                elems=1024))
    from pymerge.kernels import delta_decode as dd
    dd_sig = {"data_table": "*i64", "scale_table": "*i64", "kind_table": "*i32", "w_table": "*fp32", "out0": "*bf16",
              "out1": "*bf16", "out2": "*bf16", "out3": "*bf16", "start": "i64", "end": "i64", "n_terms": "i32"}
    for k in (1, 4):  # compressed pools: one kernel for every mix of int4/int8/dense terms (the aligned body)
        rows.append(triton_row(f"delta_decode bf16 K={k}", dd._delta_kernel, dd_sig,
                               {"K": k, "BLOCK": 2048, "COLS": 64, "ALIGNED": True, "HAS_E4M3": False},
                               [a for a in dd_sig if a != "n_terms"], num_warps=8, elems=2048))
    # What Triton's launcher does with an integer argument equal to 1: it becomes a constant.
    one = {k: v for k, v in tv_sig.items() if k != "n_models"}
    rows.append(triton_row("task_vectors bf16 n_models=1 (specialized)", tv._tv_merge_kernel, one,
                           {"n_models": 1, "IN_DT": 2, "BASE_DT": 2, "CONSENSUS": True, "NORMALIZE": True,
                            "GROUPED": True, "ALIGNED": True, "BLOCK": 1024, "HAS_E4M3": False},
                           ["tab", "out_ptr", "start", "end"], num_warps=4, fp_fusion=False, elems=1024))
    return rows + sm80_rows(ws_sig, wg_sig, tv_sig, dd_sig)


def sm80_rows(ws_sig, wg_sig, tv_sig, dd_sig) -> list:
    """The variants an A100 (sm_80) runs: every kernel, with mixed input dtypes (float8_e5m2 among them,
    float8_e4m3fn not: such calls go to the CUDA extension there), both block shapes."""
    import triton.language as tl
    from pymerge.kernels import delta_decode as dd
    from pymerge.kernels import task_vectors as tv
    from pymerge.kernels import weighted_sum as ws
    from pymerge.kernels import weighted_sum_grouped as wg
    rows = []
    ws_ptrs = ["addr_table", "code_table", "w_table", "out0", "out1", "out2", "out3", "start", "end"]
    for dt_name, dt in (("bf16", 2), ("fp8e5", 4), ("mixed", -1)):
        rows.append(triton_row(f"sm_80 weighted_sum {dt_name} K=4", ws._weighted_sum_kernel, ws_sig,
                               {"IN_DT": dt, "K": 4, "BLOCK": 4096, "ALIGNED": True, "HAS_E4M3": False, "DELTA": False},
                               ws_ptrs, num_warps=8, elems=4096, arch=80))
    rows.append(triton_row("sm_80 weighted_sum mixed K=2 tail", ws._weighted_sum_kernel, ws_sig,
                           {"IN_DT": -1, "K": 2, "BLOCK": 16, "ALIGNED": False, "HAS_E4M3": False, "DELTA": False}, [], num_warps=1,
                           arch=80))
    wg_ptrs = [a for a, t in wg_sig.items() if t.startswith("*")]
    for full, aligned in ((True, True), (False, False)):
        rows.append(triton_row(f"sm_80 grouped weighted_sum mixed K=3 {'full blocks' if full else 'partial blocks'}",
                               wg._grouped_kernel, wg_sig,
                               {"IN_DT": -1, "OUT_T": tl.bfloat16, "K": 3, "BLOCK": 1024, "FULL": full,
                                "ALIGNED": aligned, "HAS_E4M3": False}, wg_ptrs, num_warps=4, elems=1024, arch=80))
    for in_name, in_dt, base_dt in (("mixed", -1, 2), ("bf16", 2, 2)):
        rows.append(triton_row(f"sm_80 task_vectors {in_name} consensus=1 grouped=1", tv._tv_merge_kernel, tv_sig,
                               {"IN_DT": in_dt, "BASE_DT": base_dt, "CONSENSUS": True, "NORMALIZE": True,
                                "GROUPED": True, "ALIGNED": True, "BLOCK": 1024, "HAS_E4M3": False},
                               ["tab", "out_ptr", "start", "end"], num_warps=4, fp_fusion=False, elems=1024,
                               arch=80))
    rows.append(triton_row("sm_80 delta_decode bf16 K=4", dd._delta_kernel, dd_sig,
                           {"K": 4, "BLOCK": 2048, "COLS": 64, "ALIGNED": True, "HAS_E4M3": False},
                           [a for a in dd_sig if a != "n_terms"], num_warps=8, elems=2048, arch=80))
    rows.append(triton_row("sm_80 delta_decode bf16 K=2 tail", dd._delta_kernel, dd_sig,
                           {"K": 2, "BLOCK": 16, "COLS": 16, "ALIGNED": False, "HAS_E4M3": False}, [], num_warps=1,
                           arch=80))
    rows.append(triton_row("sm_80 philox draws", tv._draws_kernel, {"out_ptr": "*i64", "tab": "*i64", "n": "i32"},
                           {"BLOCK": 128, "GROUPED": True}, ["out_ptr", "tab"], num_warps=4, arch=80))
    return rows


def cuda_rows() -> list:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    rows = []
    for src in sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu")):
        with tempfile.TemporaryDirectory() as keep:  # --keep leaves the PTX ptxas compiled
            r = subprocess.run([nvcc, "-c", os.path.join("csrc", "cuda", src), "-o", os.devnull, "-O3", "-std=c++17",
                                "-Icsrc", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v", "--keep",
                                "--keep-dir", keep], cwd=ROOT, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr.strip())
            ptx = "".join(open(os.path.join(keep, f)).read() for f in os.listdir(keep) if f.endswith(".ptx"))
        entries = {m.group(1): m.start() for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx)}
        bounds = sorted(entries.values()) + [len(ptx)]
        for m in re.finditer(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                             r.stderr, re.S):
            mangled, spill, regs = m.group(1), int(m.group(2)), int(m.group(3))
            short = re.search(r"(weighted_sum_vec|weighted_sum_scalar|tv_merge_kernel|delta_accumulate_kernel)"
                              r"(?:ILi(\d+)E(?:Lb(\d)E|Li(n?\d+)E(?:Lb(\d)E)?)?)?", mangled)
            name = short.group(1) + (f" K={short.group(2)}" if short.group(2) else "") if short else mangled
            if short and short.group(3):
                name += " vec" if short.group(3) == "1" else " scalar"
            if short and short.group(4):  # the inputs' shared dtype code (csrc/codes.h), n1: mixed
                name += " " + {"0": "f32", "1": "f16", "2": "bf16", "n1": "mixed"}[short.group(4)]
            if short and short.group(5) == "1":  # weighted_sum_vec's delta form (task_arithmetic)
                name += " delta"
            start = entries.get(mangled)
            body = ptx[start:bounds[bounds.index(start) + 1]] if start is not None else ""
            rows.append({"kernel": name, "backend": "cuda", "arch": 90, "threads": 256, "registers": regs, "spill_bytes": spill,
                         "blocks_per_sm": blocks_per_sm(regs, 256), **(ptx_facts(body) if body else {})})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list (tests read it)")
    ap.add_argument("--no-cuda", dest="cuda", action="store_false", help="Triton kernels only")
    args = ap.parse_args(argv)
    rows = triton_rows() + (cuda_rows() if args.cuda else [])
    if args.json:
        print(json.dumps(rows))
        return 0
    sys.path.insert(0, HERE)
    from common import write_results
    cols = ["kernel", "backend", "arch", "threads", "registers", "spill_bytes", "blocks_per_sm", "v4_loads", "v2_loads", "scalar_loads",
            "scalar_b32_loads", "local_ops",
            "fma_f32", "div_rn_f32", "div_approx_f32", "mul_hi_u32", "neg_zero_consts", "ftz_ops", "error"]
    print(write_results("gpu_codegen_sm90", "cpu", rows, cols,
                        "GPU kernels compiled for sm_90 (and the sm_80 rows for an A100) on a machine without a GPU "
                        "(ptxas -v, PTX)", per_machine=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
