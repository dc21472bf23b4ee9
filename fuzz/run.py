"""Run every fuzz target for a bounded time; exit 1 if any of them found something.

    python fuzz/run.py --seconds N [--only TARGET ...] [--findings DIR] [--json FILE] [--engine E]

Each target gets N seconds, one after the other (the live xenstored target and the native C
targets included), so a run takes about 11 x N seconds.  Coverage-guided targets run under atheris/libFuzzer in their
own process, starting from seeds the real writers generate into a fresh corpus; without
atheris (or with ``--engine mutate``) they run a seed-mutation loop in this process instead.
Crashing inputs are written to the findings directory (default ``fuzz-findings`` under the
current directory); replay one with ``python fuzz/fz_<target>.py FILE``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

# target name -> (module, libFuzzer -max_len): lengths fit the biggest seed plus room to grow.
TARGETS = {
    "xl-header": ("fz_xl_header", 4096),
    "savestream": ("fz_savestream", 32768),
    "xenstored-wire": ("fz_xenstored_wire", 8192),
    "manifest": ("fz_manifest", 4096),
    "delta": ("fz_delta", 8192),
    "pack": ("fz_pack", 8192),
    "mgrproto": ("fz_mgrproto", 1024),
    "vtpmblk": ("fz_vtpmblk", 4096),
    "xlcfg": ("fz_xlcfg", 4096),
}
LIVE = "xenstored-live"
# Native libFuzzer targets: C compiled with clang's fuzzer, ASan and UBSan (name -> source, extra sources).
NATIVE = {"ckpt-request-c": ("ckpt_request_fuzz.c", ["vtpmmgr/src/ckpt_request.c"]),
          "xfer-request-c": ("xfer_request_fuzz.c", ["vtpmmgr/src/xfer_request.c", "vtpmmgr/src/ckpt_request.c"])}
CLANG = "clang-14"
INPUT_TIMEOUT = 10       # seconds one input may take before it counts as a hang


def have_atheris() -> bool:
    return importlib.util.find_spec("atheris") is not None


def _stat(text: str, name: str) -> int | None:
    m = re.search(rf"stat::{name}:\s+(\d+)", text)
    return int(m.group(1)) if m else None


def run_atheris(name: str, seconds: int, findings: Path) -> dict:
    module, max_len = TARGETS[name]
    script = HERE / f"{module}.py"
    with tempfile.TemporaryDirectory(prefix=f"xvfuzz-{name}-") as corpus:
        subprocess.run([sys.executable, str(script), "--write-seeds", corpus], check=True, capture_output=True)
        seeds = len(list(Path(corpus).iterdir()))
        findings.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(script), corpus, f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT}",
               f"-max_len={max_len}", "-rss_limit_mb=2048", "-print_final_stats=1",
               f"-artifact_prefix={findings}/{name}-"]
        with tempfile.TemporaryDirectory(prefix="xvfuzz-scratch-") as scratch:
            env = dict(os.environ, **{harness.SCRATCH_ENV: scratch})
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
        corpus_after = len(list(Path(corpus).iterdir()))
    out = proc.stdout + proc.stderr
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    artifacts = re.findall(r"Test unit written to (\S+)", out)
    result = {"target": name, "engine": "atheris", "seconds": seconds, "seeds": seeds,
              "executions": _stat(out, "number_of_executed_units"), "corpus": corpus_after,
              "coverage_edges": int(cov[-1][0]) if cov else None, "features": int(cov[-1][1]) if cov else None,
              "findings": []}
    if proc.returncode != 0:
        crash = re.search(r"=== Uncaught Python exception: ===\n(.*?)\n\n", out, re.S)
        summary = crash.group(1).strip().splitlines()[-1] if crash else out.strip().splitlines()[-1]
        result["findings"].append({"summary": summary, "input": artifacts[-1] if artifacts else None})
        result["log_tail"] = out[-3000:]
    return result


def native_seeds(corpus: Path) -> int:
    """The tool's and some malformed requests, as the manager reads them (fz_mgrproto's layout)."""
    import fz_mgrproto
    n = 0
    for seed in fz_mgrproto.seeds():
        if seed[:1] == fz_mgrproto.REQUEST:
            (corpus / f"seed-{n}").write_bytes(seed[1:])
            n += 1
    return n


def xfer_seeds(corpus: Path) -> int:
    """Transfer requests as the tool writes them, and some malformed ones (xfer_request_fuzz.c's layout)."""
    u, t, c, absent = "0b98742a-f827-4d32-9425-3df2ed28ad7c", "094083e5-299b-4932-8080-68b5a5ae10d7", \
        "cd06d755-c598-4542-b141-a469dd3d5cf6", "\x7f"
    seeds = [
        ["submitted", "export", u, absent, t, "ab" * 64, absent],
        ["submitted", "export", u, c, t, "ab" * 64, absent],
        ["submitted", "import", u, absent, t, absent, "01" + "cd" * 160],
        ["submitted", "import", u, c, t, absent, "01" + "cd" * 160],
        ["submitted", "unexport", u, absent, absent, absent, absent],
        ["submitted", "remove", u, absent, absent, absent, absent],
        ["submitted", "adopt", u, absent, absent, absent, absent],
        ["submitted", "export", u.upper(), absent, t, "AB" * 64, absent],
        ["submitted", "remove", u, c, t, absent, absent],
    ]
    for n, fields in enumerate(seeds):
        (corpus / f"seed-{n}").write_bytes("\0".join(fields).encode("latin-1"))
    return len(seeds)


def run_native(name: str, seconds: int, findings: Path) -> dict:
    source, extra = NATIVE[name]
    root = HERE.parent
    with tempfile.TemporaryDirectory(prefix=f"xvfuzz-{name}-") as work:
        binary = Path(work) / name
        subprocess.run([CLANG, "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
                        f"-I{root / 'vtpmmgr' / 'src'}", str(HERE / source), *(str(root / e) for e in extra),
                        "-o", str(binary)], check=True, capture_output=True)
        corpus = Path(work) / "corpus"
        corpus.mkdir()
        seeds = xfer_seeds(corpus) if name == "xfer-request-c" else native_seeds(corpus)
        findings.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([str(binary), str(corpus), f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT}",
                               "-max_len=1024", "-print_final_stats=1", f"-artifact_prefix={findings}/{name}-"],
                              capture_output=True, text=True, errors="replace")
        corpus_after = len(list(corpus.iterdir()))
    out = proc.stdout + proc.stderr
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    artifacts = re.findall(r"Test unit written to (\S+)", out)
    result = {"target": name, "engine": "libfuzzer", "seconds": seconds, "seeds": seeds,
              "executions": _stat(out, "number_of_executed_units"), "corpus": corpus_after,
              "coverage_edges": int(cov[-1][0]) if cov else None, "features": int(cov[-1][1]) if cov else None,
              "findings": []}
    if proc.returncode != 0:
        result["findings"].append({"summary": out.strip().splitlines()[-1] if out.strip() else "crash",
                                   "input": artifacts[-1] if artifacts else None})
        result["log_tail"] = out[-3000:]
    return result


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang()


def run_mutate(name: str, seconds: int, findings: Path) -> dict:
    """No coverage feedback: mutate seeds and inputs the parser accepted, for the time budget."""
    mod = importlib.import_module(TARGETS[name][0])
    pool = list(mod.seeds())
    rnd = random.Random(0)
    result = {"target": name, "engine": "mutate", "seconds": seconds, "seeds": len(pool), "executions": 0,
              "accepted": 0, "findings": []}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not result["findings"]:
            data = rnd.choice(pool) if rnd.random() < 0.5 else mutate_from(pool, rnd)
            signal.setitimer(signal.ITIMER_REAL, INPUT_TIMEOUT)
            try:
                accepted = mod.check(data)
            except _Hang:
                summary = f"hang: one input took over {INPUT_TIMEOUT} s"
            except Exception as exc:
                summary = traceback.format_exception_only(exc)[-1].strip()
            else:
                summary = None
                if accepted and len(pool) < 4096:
                    pool.append(data)
                result["accepted"] += bool(accepted)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            result["executions"] += 1
            if summary is not None:
                findings.mkdir(parents=True, exist_ok=True)
                path = findings / f"{name}-mutate-{result['executions']}"
                path.write_bytes(data)
                result["findings"].append({"summary": summary, "input": str(path)})
    finally:
        signal.signal(signal.SIGALRM, old)
    return result


def mutate_from(pool: list[bytes], rnd: random.Random) -> bytes:
    return harness.mutate(rnd.choice(pool), rnd)


def run_live(seconds: int, findings: Path) -> dict:
    import live_xenstored
    seed = int(time.time())
    stats = live_xenstored.run(seconds, seed=seed, findings_dir=findings)
    return {"target": LIVE, "engine": "live", "seconds": seconds, "seed": seed,
            "executions": stats.pop("packets"), **stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python fuzz/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, required=True, help="time budget of each target")
    ap.add_argument("--only", nargs="+", choices=[*TARGETS, *NATIVE, LIVE], help="run just these targets")
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"), help="where crashing inputs go")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    args = ap.parse_args(argv)
    if args.seconds < 1:
        ap.error("--seconds must be at least 1")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "mutate"
        if engine == "mutate":
            print("atheris is not installed: no coverage feedback, seed mutation only", file=sys.stderr)
    elif engine == "atheris" and not have_atheris():
        ap.error("atheris is not installed (pip install atheris)")
    findings = args.findings.resolve()
    results = []
    for name in args.only or [*TARGETS, *NATIVE, LIVE]:
        if name == LIVE:
            res = run_live(args.seconds, findings)
        elif name in NATIVE:
            res = run_native(name, args.seconds, findings)
        elif engine == "atheris":
            res = run_atheris(name, args.seconds, findings)
        else:
            res = run_mutate(name, args.seconds, findings)
        results.append(res)
        found = res["findings"]
        print(f"{name:15} {res['engine']:8} {res['seconds']:5d} s  {res['executions'] or 0:>10,} execs  "
              f"{'cov ' + str(res['coverage_edges']) if res.get('coverage_edges') else '':9}  "
              f"{len(found)} finding(s)", flush=True)
        for f in found:
            print(f"    {f.get('summary') or f.get('signature')}  input: {f.get('input') or f.get('reproducer')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
