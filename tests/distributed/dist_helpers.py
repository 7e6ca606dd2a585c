"""Launch ``worker.py`` under torchrun from a test and collect its per-task results."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")


def torchrun(nproc: int, tasks: list[dict], workdir: Path, timeout: float = 240) -> dict[str, dict]:
    """Run ``worker.py`` on ``nproc`` ranks; return {task name: result}. Fails with the workers' stderr."""
    tasks_path, results_path = workdir / f"tasks-{nproc}.json", workdir / f"results-{nproc}.jsonl"
    tasks_path.write_text(json.dumps(tasks))
    results_path.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(tasks_path), str(results_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    (workdir / f"stderr-{nproc}.txt").write_text(proc.stderr)
    results = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            results[r["name"]] = r
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    # DTensor repeats one performance warning per step and rank; keep the lines that say what went wrong
    lines = [ln for ln in proc.stderr.splitlines() if "While redistributing" not in ln]
    assert proc.returncode == 0 and not errors, (errors, "\n".join(lines)[-6000:])
    return results
