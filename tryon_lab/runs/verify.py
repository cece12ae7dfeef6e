"""Verify: re-run a recorded run with its recorded parameters and compare inputs and outputs with it.

Records are portable (repo-relative / ``<cache>/`` paths), so a run folder copied into another clone verifies
there. Where a record still names a location (an input recorded at another absolute path, a
``checkpoint.describe_model`` line "kind at PATH [fingerprint F]" in a metrics file), the comparison is by
content: same sha256 / fingerprint elsewhere is a *moved* input, reported as a ``note``, not a failure.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .execute import Job, run_jobs, unique_dir
from .record import (
    IMAGE_SUFFIXES,
    PathLike,
    device_text,
    environment,
    hash_inputs,
    portable_path,
    portable_text,
    read_json,
    resolve_path,
    write_json,
)

DESCRIBED = re.compile(r"^(?P<kind>.*) at (?P<path>.+) \[fingerprint (?P<fp>[0-9a-f]+)\]$")
VERIFY_DIR = re.compile(r"\.verify(-\d{8}-\d{6}(-\d+)?)?$")


def is_verify_dir(p: Path) -> bool:
    return bool(VERIFY_DIR.search(p.name))


def _psnr(a: Path, b: Path) -> float:
    from PIL import Image

    from ..metrics import psnr  # the workbench's one PSNR

    with Image.open(a) as ia, Image.open(b) as ib:
        if ia.mode != ib.mode or ia.size != ib.size:
            return -math.inf
        return psnr(ia.convert("RGB"), ib.convert("RGB"))


def _same_described(a: str, b: str) -> bool:
    """Two "kind at PATH [fingerprint F]" lines naming the same model (kind and fingerprint) at other paths."""
    ma, mb = DESCRIBED.match(a), DESCRIBED.match(b)
    return bool(ma and mb and ma["kind"] == mb["kind"] and ma["fp"] == mb["fp"])


def _json_diff(a: Any, b: Any, rtol: float, ignore: Sequence[str], notes: list[str], key: str = "") -> list[str]:
    if any(fnmatch.fnmatch(key, pat) for pat in ignore):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in _json_diff(a.get(k), b.get(k), rtol, ignore, notes, f"{key}.{k}" if key else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _json_diff(x, y, rtol, ignore, notes, f"{key}[{i}]")]
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=rtol) else [f"{key}: {a} -> {b}"]
    if isinstance(a, str) and isinstance(b, str) and a != b:
        if portable_text(a) == portable_text(b):
            return []
        if _same_described(a, b):
            notes.append(f"{key} moved: {DESCRIBED.match(a)['path']} -> {DESCRIBED.match(b)['path']} "
                         "(same model fingerprint)")
            return []
    return [] if a == b else [f"{key}: {a!r} -> {b!r}"]


def compare_output(name: str, old: Path, new: Path, recorded_sha: str, new_sha: str,
                   tol: Mapping[str, Any]) -> str:
    """Report line(s) comparing a recorded output with its re-run: the verdict first ('ok' / 'FAIL ...'),
    then any 'note' lines. JSON files are compared by value (exactly unless ``metrics_rtol`` /
    ``metrics_ignore``); a model named at another path with the same fingerprint is a note."""
    from ..provenance import sha256_file

    if recorded_sha == new_sha:
        return f"ok    {name} (bit-exact: matches the recorded sha256)"
    use_psnr = old.suffix.lower() in IMAGE_SUFFIXES and "image_psnr_min" in tol
    if not (use_psnr or old.suffix == ".json"):
        return f"FAIL  regression: {name} differs (bit-exact expected)"
    if not old.is_file() or sha256_file(old, cache=False) != recorded_sha:
        return f"FAIL  cannot compare {name}: recorded file changed or missing"
    if use_psnr:
        p, lim = _psnr(old, new), float(tol["image_psnr_min"])
        return f"{'ok   ' if p >= lim else 'FAIL  regression:'} {name} PSNR {p:.2f} dB (min {lim})"
    notes: list[str] = []
    rtol = float(tol.get("metrics_rtol", 0.0))
    diffs = _json_diff(read_json(old), read_json(new), rtol, list(tol.get("metrics_ignore", [])), notes)
    if diffs:
        return f"FAIL  regression: {name} values differ: " + "; ".join(diffs[:8])
    return "\n".join([f"ok    {name} (values match" + (f" within metrics_rtol={rtol})" if rtol else ")")]
                     + [f"note  {name}: {n}" for n in notes])


def _check_inputs(inputs: Mapping[str, Any]) -> tuple[list[str], bool, dict[str, dict]]:
    """Re-hash recorded inputs: (messages, changed, {name: record} of inputs with files gone from their path).

    A file that hashes differently at its recorded path is a changed input; a file that is gone may have
    moved: that is decided against what the re-run records."""
    msgs, missing = [], {}
    for iname, rec in inputs.items():
        now = hash_inputs(rec["paths"], cache=False)
        gone, n_before = False, len(msgs)
        for path in sorted(set(now) | set(rec["files"])):
            if now.get(path) == rec["files"].get(path):
                continue
            if now.get(path) is None and rec["files"].get(path) is not None:
                gone = True
            else:
                msgs.append(f"FAIL  input changed: {iname} {path}" + (" (new file)" if path not in rec["files"] else ""))
        if gone and len(msgs) == n_before:
            missing[iname] = rec
    return msgs, bool(msgs), missing


def _moved(iname: str, old: Mapping[str, Any], new: Mapping[str, Any] | None) -> str:
    """A recorded input gone from its path against the re-run's record of it: moved (note) or changed."""
    old_h, new_h = sorted(h or "" for h in old["files"].values()), sorted(h or "" for h in (new or {}).get("files", {}).values())
    where = f"{', '.join(old['paths'])} -> {', '.join((new or {}).get('paths', ['?']))}"
    if new is not None and old_h == new_h and "" not in new_h:
        return f"note  input moved: {iname} {where} (same sha256)"
    return f"FAIL  input changed: {iname} {where} (missing at its recorded path, contents differ)"


def verify(run_dir: PathLike, kernel: str = "python3", progress: bool = False,
           keep: bool = False) -> tuple[bool, str]:
    """Re-run a recorded run with its recorded parameters and compare against it.

    Inputs are re-hashed first (a changed input is reported as ``input changed``, and that notebook is
    not re-run; one gone from its recorded path is compared by hash with the re-run's: ``input moved`` is a
    note); recorded outputs must still hash as in the manifest (else ``output modified after run``); re-run
    outputs must be bit-exact, equal by value (JSON), or within the notebook's recorded tolerances.
    Each verify re-runs into its own new sibling folder ``<run>.verify-<YYYYmmdd-HHMMSS>[-n]`` (removed
    when everything passed, unless ``keep``). A sweep folder verifies each of its runs.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "manifest.json").is_file():
        subs = sorted(p.parent for p in run_dir.glob("*/manifest.json") if not is_verify_dir(p.parent))
        if not subs:
            return False, f"FAIL  no manifest.json in {run_dir}"
        results = [verify(s, kernel, progress, keep) for s in subs]
        return all(ok for ok, _ in results), "\n\n".join(r for _, r in results)
    from ..provenance import sha256_file

    m = read_json(run_dir / "manifest.json")
    env = environment()
    lines = [f"verify {run_dir}"] + [
        f"  {when:<9} git {(x.get('git') or {}).get('commit')} dirty={(x.get('git') or {}).get('dirty')} "
        f"on {x.get('host')}, {device_text(x.get('device'))}" for when, x in (("recorded:", m), ("now:", env))]
    checks: dict[str, list[str]] = {}
    jobs, pairs, moved = [], [], {}
    for e in m["notebooks"]:
        msgs = checks.setdefault(e["dir"], [])
        if e["status"] != "ok":
            msgs.append(f"FAIL  cannot verify: status in recorded run was {e['status']}")
        for f, sha in e.get("outputs", {}).items():
            p = run_dir / e["dir"] / f
            if not p.is_file() or sha256_file(p, cache=False) != sha:
                msgs.append(f"FAIL  output modified after run: {e['dir']}/{f}"
                            + ("" if p.is_file() else " (missing)"))
        found, changed, moved[e["dir"]] = _check_inputs(e.get("inputs", {}))
        msgs += found
        nb = resolve_path(e["notebook"])
        if not nb.is_file():
            msgs.append(f"FAIL  notebook missing: {e['notebook']}")
        elif changed or e["status"] != "ok":
            msgs.append("skip  re-run (see above)")
        else:
            if sha256_file(nb, cache=False) != e.get("notebook_sha256"):
                msgs.append(f"note  {e['notebook']} changed since the recorded run")
            jobs.append(Job(nb, {k: v for k, v in e["parameters"].items() if k != "output_dir"}))
            pairs.append(e)
    out = None
    if jobs:
        out = unique_dir(run_dir.parent, f"{run_dir.name}.verify-{dt.datetime.now():%Y%m%d-%H%M%S}")
        new = run_jobs(out, jobs, f"verify {m['name']}", kernel, progress,
                       extra={"verify_of": portable_path(run_dir)})
        for e, n in zip(pairs, new["notebooks"], strict=True):
            msgs = checks[e["dir"]]
            moves = [_moved(iname, rec, n.get("inputs", {}).get(iname)) for iname, rec in moved[e["dir"]].items()]
            msgs += moves
            if n["status"] != "ok":
                msgs.append(f"FAIL  regression: re-run {n['status']}: {n.get('error')}")
                continue
            if any(x.startswith("FAIL") for x in moves):
                msgs.append("skip  output comparison (an input changed)")
                continue
            old_o, new_o = e.get("outputs", {}), n["outputs"]
            for f in sorted(set(old_o) | set(new_o)):
                if f not in new_o:
                    msgs.append(f"FAIL  regression: {f} not produced by the re-run")
                elif f not in old_o:
                    msgs.append(f"FAIL  regression: {f} is new (not in the recorded run)")
                else:
                    msgs += compare_output(f, run_dir / e["dir"] / f, out / n["dir"] / f, old_o[f], new_o[f],
                                           e.get("tolerances", {})).splitlines()
    fails = sum(msg.startswith("FAIL") for msgs in checks.values() for msg in msgs)
    for d, msgs in checks.items():
        bad = any(msg.startswith("FAIL") for msg in msgs)
        lines += [f"[{d}] {'FAILED' if bad else 'OK'}"] + [f"  {msg}" for msg in msgs]
    if out is not None and (fails or keep):
        lines.append(f"re-run kept in {out}")
    lines.append(f"RESULT: {'OK' if not fails else f'FAILED ({fails} problem(s))'}")
    report = "\n".join(lines)
    if out is not None and (fails or keep):
        (out / "verify.txt").write_text(report + "\n")
        write_json(out / "verify.json", {"verify_of": portable_path(run_dir), "ok": not fails, "report": lines})
    elif out is not None:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return not fails, report
