// Validates Kubernetes manifests offline against the API schemas.
//
//   node validate.mjs PATH...     PATH: a YAML file, or a directory (its kustomization.yaml's
//                                 resources, else every *.yaml / *.yml in it)
//
// Every document must be an object with apiVersion and kind, of a kind we have a schema for:
// the core and apps/... groups from `kubernetes-models`, monitoring.coreos.com (PodMonitor,
// ServiceMonitor, PrometheusRule, ...) from `@kubernetes-models/prometheus-operator` (the
// operator's CRD schemas). A Kustomization is checked by hand (apiVersion, kind, resources that
// exist), since it is a kustomize file, not an API object. Beyond the schemas, one rule of ours:
// every container and init container names an image (the API schema leaves it optional because
// a controller may fill it in; nothing of ours does). And strict fields, as `kubectl apply`
// checks them: a field its type does not declare is an error (strict_fields.mjs), since the
// schemas accept unknown properties and the API server would drop a misspelt one silently.
//
// Prints one line per object ("ok  file: Kind/name") and the errors; exits 0 when everything
// is valid, 1 when something is not, 2 on usage errors.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";
import { hasDeclarations, unknownFields } from "./strict_fields.mjs";

const NODE_MODULES = path.join(path.dirname(fileURLToPath(import.meta.url)), "node_modules");

const CORE = "kubernetes-models";
const OPERATOR = "@kubernetes-models/prometheus-operator";

async function modelFor(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string" || !/^[A-Z][A-Za-z0-9]*$/.test(kind))
    return null;
  const slash = apiVersion.indexOf("/");
  let spec;
  if (slash < 0) spec = `${CORE}/${apiVersion}/${kind}`;
  else if (apiVersion.startsWith("monitoring.coreos.com/")) spec = `${OPERATOR}/${apiVersion}/${kind}`;
  else spec = `${CORE}/${apiVersion}/${kind}`;
  try {
    const mod = await import(spec);
    return mod[kind] ?? null;
  } catch {
    return null;
  }
}

function podSpecOf(doc) {
  if (doc.kind === "Pod") return doc.spec;
  return doc.spec?.template?.spec ?? doc.spec?.jobTemplate?.spec?.template?.spec;
}

function ourRules(doc) {
  const errors = [];
  const spec = podSpecOf(doc);
  if (!spec) return errors;
  for (const list of ["initContainers", "containers"])
    for (const [i, c] of (spec[list] ?? []).entries())
      if (!c || typeof c.image !== "string" || c.image.length === 0)
        errors.push(`${list}[${i}] (${c?.name ?? "unnamed"}) has no image`);
  return errors;
}

function describe(doc) {
  return `${doc?.kind ?? "?"}/${doc?.metadata?.name ?? "?"}`;
}

let failures = 0;
function fail(where, msg) {
  failures++;
  console.log(`ERR ${where}: ${msg}`);
}

async function validateFile(file) {
  let text;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (e) {
    fail(file, `cannot read: ${e.message}`);
    return [];
  }
  const docs = parseAllDocuments(text, { uniqueKeys: true, strict: true });
  const parsed = [];
  for (const d of docs) {
    if (d.errors.length) {
      for (const e of d.errors) fail(file, `YAML: ${e.message.split("\n")[0]}`);
      continue;
    }
    const obj = d.toJS();
    if (obj === null || obj === undefined) continue; // an empty document (comments only)
    parsed.push(obj);
  }
  for (const obj of parsed) {
    if (typeof obj !== "object" || Array.isArray(obj)) {
      fail(file, "a document that is not an object");
      continue;
    }
    if (obj.kind === "Kustomization") continue; // checked by validateKustomization
    const Model = await modelFor(obj.apiVersion, obj.kind);
    if (!Model) {
      fail(file, `no schema for apiVersion ${JSON.stringify(obj.apiVersion)} kind ${JSON.stringify(obj.kind)}`);
      continue;
    }
    let ok = true;
    try {
      new Model(obj).validate();
    } catch (e) {
      ok = false;
      const details = (e.errors ?? []).map((x) => `${x.instancePath || "/"} ${x.message}`);
      fail(`${file} ${describe(obj)}`, details.length ? details.join("; ") : e.message);
    }
    if (!hasDeclarations(NODE_MODULES, obj.apiVersion, obj.kind)) {
      ok = false;
      fail(`${file} ${describe(obj)}`, "no field declarations for this kind: unknown fields cannot be checked");
    }
    for (const msg of unknownFields(NODE_MODULES, obj)) {
      ok = false;
      fail(`${file} ${describe(obj)}`, msg);
    }
    for (const msg of ourRules(obj)) {
      ok = false;
      fail(`${file} ${describe(obj)}`, msg);
    }
    if (ok) console.log(`ok  ${file}: ${describe(obj)}`);
  }
  return parsed;
}

async function validateKustomization(dir, file) {
  const docs = await validateFile(file);
  const k = docs[0];
  if (docs.length !== 1 || !k || k.kind !== "Kustomization" || k.apiVersion !== "kustomize.config.k8s.io/v1beta1") {
    fail(file, "not one kustomize.config.k8s.io/v1beta1 Kustomization");
    return;
  }
  if (!Array.isArray(k.resources) || k.resources.some((r) => typeof r !== "string")) {
    fail(file, "resources must be a list of paths");
    return;
  }
  console.log(`ok  ${file}: Kustomization (${k.resources.length} resources)`);
  for (const r of k.resources) {
    const p = path.join(dir, r);
    if (!fs.existsSync(p)) fail(file, `resource ${r} does not exist`);
    else await validatePath(p);
  }
}

async function validatePath(p) {
  let st;
  try {
    st = fs.statSync(p);
  } catch (e) {
    fail(p, `cannot read: ${e.message}`);
    return;
  }
  if (!st.isDirectory()) {
    await validateFile(p);
    return;
  }
  for (const name of ["kustomization.yaml", "kustomization.yml", "Kustomization"]) {
    const k = path.join(p, name);
    if (fs.existsSync(k)) {
      await validateKustomization(p, k);
      return;
    }
  }
  const files = fs.readdirSync(p).filter((f) => /\.ya?ml$/.test(f)).sort();
  if (!files.length) fail(p, "no YAML files");
  for (const f of files) await validateFile(path.join(p, f));
}

const args = process.argv.slice(2);
if (!args.length || args.includes("--help")) {
  console.error("usage: node validate.mjs PATH...   (files, or directories with a kustomization.yaml)");
  process.exit(args.length ? 0 : 2);
}
for (const a of args) await validatePath(a);
console.log(failures ? `${failures} error(s)` : "all valid");
process.exit(failures ? 1 : 0);
