"""deploy/Dockerfile and .dockerignore, read as Docker would (no container runtime is needed: scripts/docker-smoke
builds the image where one answers). The Dockerfile's structure (stages, final USER, entrypoint, what is copied,
how torch is installed) and the build context the .dockerignore rules leave.
"""

from __future__ import annotations

import re
import subprocess

from deploy_helpers import (ROOT, copy_sources, dockerfile_instructions, dockerignore_patterns, exec_form, glob_in,
                            in_build_context, stages)


def dockerfile():
    return stages(dockerfile_instructions((ROOT / "deploy" / "Dockerfile").read_text()))


def test_dockerfile_is_multistage_non_root_and_serves():
    st = dockerfile()
    assert len(st) >= 2, "a builder stage and a runtime stage"
    aliases = {s["alias"] for s in st}
    for s in st:
        assert ":" in s["image"] and not s["image"].endswith(":latest"), s["image"]
    final = st[-1]["instructions"]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must end as a non-root user"
    entry = exec_form(next(rest for word, rest in final if word == "ENTRYPOINT"))
    cmd = exec_form(next(rest for word, rest in final if word == "CMD"))
    assert entry + cmd[:1] == ["cubelm", "serve"]
    from cubelm.cli import parse_options
    parse_options(cmd)  # the default command is a valid `cubelm serve` command line
    for s in st:
        for word, rest in s["instructions"]:
            if word in ("COPY", "ADD"):
                sources, stage = copy_sources(rest)
                assert stage is None or stage in aliases, f"COPY --from={stage}: no such stage"
                for src in sources:
                    assert not re.search(r"(^|/)models?(/|$)|\.safetensors$|\.bin$|\.pt$", src), \
                        f"{word} {src}: models come from the store at start, never from the image"
                    assert not src.startswith(("http://", "https://")), "ADD of a URL: unpinned, unverified"


def test_dockerfile_installs_the_pinned_cpu_torch_before_cubelm():
    import tomllib
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    builder = dockerfile()[0]["instructions"]
    args = dict(rest.split("=", 1) for word, rest in builder if word == "ARG" and "=" in rest)
    assert "torch==" + args["TORCH_VERSION"] == torch_pin
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = [rest for word, rest in builder if word == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    package_step = next(i for i, r in enumerate(runs) if re.search(r'pip install "\.\[', r))
    assert torch_step < package_step and "--index-url" in runs[torch_step]


def test_dockerignore_lets_in_what_the_build_copies_and_no_model():
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    context = [f for f in tracked if in_build_context(f, patterns)]
    for stage in dockerfile():
        for word, rest in stage["instructions"]:
            if word == "COPY":
                sources, from_stage = copy_sources(rest)
                if from_stage is None:
                    for src, files in glob_in(sources, context).items():
                        assert files, f"COPY {src}: nothing in the build context"
    assert "src/cubelm/engine/kernels/paged_decode.c" in context  # package data the kernels compile from
    for unwanted in ("models/default/model.safetensors", "src/cubelm/x.safetensors", ".venv/bin/python",
                     ".git/HEAD", "runs/default/ckpt/model.pt", "tests/test_deploy.py",
                     "src/cubelm/__pycache__/cli.cpython-311.pyc", "deploy/k8s/base/serve.yaml"):
        assert not in_build_context(unwanted, patterns), unwanted
