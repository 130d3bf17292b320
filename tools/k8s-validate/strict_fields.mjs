// Unknown fields: the API schemas of kubernetes-models let an object carry properties they do not
// define (the OpenAPI documents do), so a misspelt field (`readynessProbe`, `replica`) passes
// their validation, while `kubectl apply` (strict field validation) refuses it and the API server
// would otherwise drop it silently. This walks an object along the models' type declarations
// (the generated .d.ts files: one interface per API type, one `"field"?: Type;` line per field,
// nested types imported by name) and names every field its type does not declare.
//
//   unknownFields(nodeModules, obj) -> ["/spec/replica: unknown field (replicas?)", ...]
//
// Types it cannot follow (inline object types such as label maps, aliases such as IntOrString,
// kinds without declarations) are not looked into: the check only ever adds errors for fields
// a declared interface lacks. Parsed files are cached for the process.
import fs from "node:fs";
import path from "node:path";

const parsed = new Map(); // .d.ts path -> {dir, imports, ifaces, aliases} (null: unreadable)

function names(list) {
  // "A, B as C" -> [["A", "A"], ["B", "C"]]
  return list.split(",").map((p) => {
    const [orig, alias] = p.trim().split(/\s+as\s+/);
    return [orig, alias ?? orig];
  });
}

function parse(file) {
  if (parsed.has(file)) return parsed.get(file);
  let text = null;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch {
    parsed.set(file, null);
    return null;
  }
  const imports = new Map(); // local name -> {orig, spec}
  for (const m of text.matchAll(/^import \{ ([^}]+) \} from "([^"]+)";$/gm))
    for (const [orig, local] of names(m[1])) imports.set(local, { orig, spec: m[2] });
  const ifaces = new Map(); // interface name -> Map(field -> type text)
  for (const m of text.matchAll(/^export interface (\w+)(?: extends [\w, ]+)? \{\n([\s\S]*?)^\}/gm)) {
    const fields = new Map();
    for (const f of m[2].matchAll(/^ {4}"([^"]+)"\??: (.*)$/gm)) fields.set(f[1], f[2].replace(/;$/, ""));
    ifaces.set(m[1], fields);
  }
  const aliases = new Map(); // exported name -> local interface name
  for (const m of text.matchAll(/^export type \{ ([^}]+) \};$/gm))
    for (const [orig, alias] of names(m[1])) aliases.set(alias, orig);
  const p = { dir: path.dirname(file), imports, ifaces, aliases };
  parsed.set(file, p);
  return p;
}

function moduleFile(nodeModules, fromDir, spec) {
  const base = spec.startsWith(".") ? path.join(fromDir, spec) : path.join(nodeModules, spec);
  return base.replace(/\.js$/, "") + ".d.ts";
}

// The fields of type `name` as seen from parsed file `p`: {fields, file} or null.
function resolve(nodeModules, p, name, depth = 0) {
  if (!p || depth > 4) return null;
  const local = p.aliases.get(name) ?? name;
  if (p.ifaces.has(local)) return { fields: p.ifaces.get(local), p };
  const imp = p.imports.get(name);
  if (!imp) return null;
  return resolve(nodeModules, parse(moduleFile(nodeModules, p.dir, imp.spec)), imp.orig, depth + 1);
}

function isObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

function distance(a, b) {
  const d = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = d[0];
    d[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = d[j];
      d[j] = Math.min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return d[b.length];
}

function suggestion(key, fields) {
  let best = null;
  let bestD = 3; // at most two edits away
  for (const f of fields.keys()) {
    const d = f.toLowerCase() === key.toLowerCase() ? 0 : distance(key, f);
    if (d < bestD) [best, bestD] = [f, d];
  }
  return best ? ` (${best}?)` : "";
}

function walk(nodeModules, obj, type, where, errors) {
  const { fields, p } = type;
  for (const [key, value] of Object.entries(obj)) {
    const t = fields.get(key);
    if (t === undefined) {
      errors.push(`${where}/${key}: unknown field${suggestion(key, fields)}`);
      continue;
    }
    const arr = /^Array<(\w+)>$/.exec(t);
    const ref = arr ? arr[1] : /^\w+$/.test(t) ? t : null;
    if (!ref) continue;
    const sub = resolve(nodeModules, p, ref);
    if (!sub) continue;
    if (arr && Array.isArray(value))
      value.forEach((x, i) => isObject(x) && walk(nodeModules, x, sub, `${where}/${key}/${i}`, errors));
    else if (!arr && isObject(value)) walk(nodeModules, value, sub, `${where}/${key}`, errors);
  }
}

// The declaration file of a kind: kubernetes-models/<group/version>/<Kind>.d.ts (core: v1/), or
// the prometheus-operator models for monitoring.coreos.com.
function kindFile(nodeModules, apiVersion, kind) {
  if (apiVersion.startsWith("monitoring.coreos.com/"))
    return path.join(nodeModules, "@kubernetes-models/prometheus-operator", apiVersion, `${kind}.d.ts`);
  return path.join(nodeModules, "kubernetes-models", apiVersion, `${kind}.d.ts`);
}

export function unknownFields(nodeModules, obj) {
  const errors = [];
  if (!isObject(obj) || typeof obj.apiVersion !== "string" || typeof obj.kind !== "string") return errors;
  const p = parse(kindFile(nodeModules, obj.apiVersion, obj.kind));
  const top = resolve(nodeModules, p, `I${obj.kind}`);
  if (top) walk(nodeModules, obj, top, "", errors);
  return errors;
}

// Whether a kind's declarations were found (for the caller to say so when they were not).
export function hasDeclarations(nodeModules, apiVersion, kind) {
  return resolve(nodeModules, parse(kindFile(nodeModules, apiVersion, kind)), `I${kind}`) !== null;
}
