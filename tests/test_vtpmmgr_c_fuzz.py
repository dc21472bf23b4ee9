"""The libFuzzer target of the C request parser (fuzz/ckpt_request_fuzz.c): it runs clean on the
real parser, and it finds a parser that accepts a non-canonical UUID."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fuzz"))
import run as fuzz_run  # noqa: E402


def test_the_c_parser_survives_its_fuzzer(tmp_path):
    res = fuzz_run.run_native("ckpt-request-c", 3, tmp_path / "findings")
    assert res["findings"] == [], res.get("log_tail")
    assert res["seeds"] >= 4 and res["executions"] > 1000 and res["coverage_edges"] > 50


def test_the_transfer_parser_survives_its_fuzzer(tmp_path):
    res = fuzz_run.run_native("xfer-request-c", 3, tmp_path / "findings")
    assert res["findings"] == [], res.get("log_tail")
    assert res["seeds"] >= 9 and res["executions"] > 1000 and res["coverage_edges"] > 50


def test_the_fuzzer_finds_a_lenient_parser(tmp_path):
    broken = tmp_path / "ckpt_request.c"
    src = (ROOT / "vtpmmgr" / "src" / "ckpt_request.c").read_text()
    lenient = src.replace("\treturn -1;      /* upper case is not canonical */",
                          "\treturn c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;")
    assert lenient != src
    broken.write_text(lenient)
    binary = tmp_path / "fuzz"
    subprocess.run([fuzz_run.CLANG, "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                    f"-I{ROOT / 'vtpmmgr' / 'src'}", str(ROOT / "fuzz" / "ckpt_request_fuzz.c"), str(broken),
                    "-o", str(binary)], check=True, capture_output=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    fuzz_run.native_seeds(corpus)
    out = subprocess.run([str(binary), str(corpus), "-max_total_time=60", f"-artifact_prefix={tmp_path}/"],
                         capture_output=True, text=True, errors="replace", timeout=120)
    assert out.returncode != 0 and "deadly signal" in out.stderr
