"""Helpers for tests/test_deploy.py: render the Kustomize trees, read a Dockerfile and a .dockerignore, expand a
container's ``$(VAR)`` references the way the kubelet does, and validate custom resources against CRD schemas.

Rendering uses the real kustomize (``kustomize build`` or ``kubectl kustomize``, which embeds it): the rendered
output is what gets validated, so a patch that does not apply or a generator that renames a ConfigMap is tested
as a cluster would receive it.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
TREES = ("base", "overlays/cpu", "overlays/gpu", "overlays/rag")


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(tree: str) -> list[dict]:
    cmd = kustomize_command()
    proc = subprocess.run([*cmd, str(K8S / tree)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} {tree} failed: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# ---- containers -------------------------------------------------------------------------------------------------
def env_values(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (values, ConfigMap keys, resource fields); a missing
    non-optional ConfigMap key is an assertion error (the pod would not start)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            data = configmaps.get(ref["name"], {}).get("data", {})
            if ref["key"] in data:
                env[e["name"]] = data[ref["key"]]
            else:
                assert ref.get("optional"), f"env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']}"
        elif "resourceFieldRef" in src:
            ref = src["resourceFieldRef"]
            kind, res = ref["resource"].split(".", 1)
            env[e["name"]] = str(container["resources"][kind][res])
        # secretKeyRef / fieldRef values are not known before the pod runs
    return env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of command and args; an unknown reference would be left as is by the
    kubelet (a silent bug), so here it is an assertion error."""
    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not defined in the container's environment"
        return env[m.group(1)]
    return [re.sub(r"\$\((\w+)\)", sub, a) for a in args]


# ---- Dockerfile ---------------------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(instructions: list[tuple[str, str]]) -> list[dict]:
    """One dict per FROM: image, alias, and its instructions."""
    result: list[dict] = []
    for word, rest in instructions:
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append({"image": parts[0], "alias": alias, "instructions": []})
        elif result:
            result[-1]["instructions"].append((word, rest))
    return result


def exec_form(rest: str) -> list[str]:
    """The argument list of CMD/ENTRYPOINT/RUN, exec (JSON) or shell form."""
    import json
    rest = rest.strip()
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def copy_sources(rest: str) -> tuple[list[str], str | None]:
    """The sources of a COPY/ADD and its --from stage (None for the build context)."""
    words = shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return paths[:-1], source_stage


# ---- .dockerignore (the subset of Docker's rules this repository's file uses) -------------------------------------
def dockerignore_patterns(text: str) -> list[tuple[str, bool]]:
    """``(pattern, negated)`` in file order."""
    pats = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pats.append((line[1:].strip().strip("/") if neg else line.strip("/"), neg))
    return pats


def _match(pattern: str, path: str) -> bool:
    """Docker's matching: ``*`` never crosses a ``/``; ``**`` matches any number of directories."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.fullmatch(regex, path) is not None


def in_build_context(path: str, patterns: list[tuple[str, bool]]) -> bool:
    """Whether ``path`` (relative, with ``/``) reaches the build context: the last pattern that matches the path
    or one of its parent directories decides (Docker's rule)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for pattern, negated in patterns:
        if any(_match(pattern, p) for p in prefixes):
            included = negated
    return included


def glob_in(sources: list[str], files: list[str]) -> dict[str, list[str]]:
    """For each COPY source, the context files it brings in (a directory brings its whole tree)."""
    out = {}
    for src in sources:
        src = src.rstrip("/").removeprefix("./")
        out[src] = [f for f in files if f == src or f.startswith(src + "/") or fnmatch.fnmatch(f, src)]
    return out


# ---- CRDs ---------------------------------------------------------------------------------------------------------
def crd_schemas(directory: Path) -> dict[tuple[str, str], dict]:
    """``(apiVersion, kind) -> JSON schema`` from the CustomResourceDefinition YAML files in ``directory``."""
    out = {}
    for f in sorted(directory.glob("*.y*ml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                schema = strict_schema(v["schema"]["openAPIV3Schema"])
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = schema
    return out


def strict_schema(node):
    """An OpenAPI v3 structural schema as a JSON schema that rejects unknown fields (kubectl --validate=strict),
    except under ``x-kubernetes-preserve-unknown-fields``; int-or-string fields accept both."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out
