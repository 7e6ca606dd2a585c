// Validate custom resources against kubernetes-models' schemas (generated from KEDA's and prometheus-operator's Go
// API types, the same types their published CRDs are generated from). Input on stdin: a JSON array of objects.
// Output: one JSON line per object, {kind, name, ok, errors}. Run by tests/test_deploy.py.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = process.env.CUBELM_CRD_VALIDATORS || join(here, "node_modules");
const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js",
  "monitoring.coreos.com/v1/ServiceMonitor":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
};

for (const obj of JSON.parse(readFileSync(0, "utf8"))) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const result = { kind: obj.kind, name: obj.metadata?.name, ok: false, errors: [] };
  if (!(key in MODELS)) {
    result.errors.push(`no schema for ${key}`);
  } else {
    const mod = await import(pathToFileURL(join(modules, MODELS[key])).href);
    try {
      new mod[obj.kind](obj).validate();
      result.ok = true;
    } catch (e) {
      result.errors = (e.errors || [{ message: e.message }]).map((x) => `${x.instancePath || ""} ${x.message}`);
    }
  }
  console.log(JSON.stringify(result));
}
