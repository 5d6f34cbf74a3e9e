// The console's pages. Each renders into the main element; the server enforces every permission, the
// console only hides what the signed-in role cannot use.
import { api, stream } from "./api.js";
import { barChart, download, empty, fmt, form, h, lineChart, loading, table } from "./ui.js";

const hour = 3600 * 1000;
const iso = (ms) => new Date(ms).toISOString();
const day = (date) => date.toISOString().slice(0, 10);
const list = async (path) => (await api(path)).data;

// Every row of a paged admin listing (the API gives at most 200 at a time).
async function listAll(path) {
  const rows = [];
  for (let offset = 0; ; offset += 200) {
    const page = await api(`${path}${path.includes("?") ? "&" : "?"}limit=200&offset=${offset}`);
    rows.push(...page.data);
    if (!page.data.length || rows.length >= (page.total ?? rows.length)) return rows;
  }
}
const stateBadge = (state) => h("strong", { class: `state-${state}` }, state);

function section(title, ...children) {
  return h("section", { class: "card", "aria-label": title }, h("h2", {}, title), ...children);
}

function confirmButton(label, question, action) {
  return h("button", { type: "button", class: "danger", onclick: async (event) => {
    if (!window.confirm(question)) return;
    event.target.disabled = true;
    try {
      await action();
    } catch (error) {
      event.target.after(h("span", { class: "error", role: "alert" }, ` ${error.message}`));
      event.target.disabled = false;
    }
  } }, label);
}

// ---- Overview ----------------------------------------------------------------------------------------------
export async function overview(main) {
  const [health, history] = await Promise.all([
    api("/admin/health/concurrency"),
    list(`/admin/health/history?from=${encodeURIComponent(iso(Date.now() - hour))}`),
  ]);
  const minutes = new Map();
  for (const row of history) {
    const at = Date.parse(row.minute.endsWith("Z") || row.minute.includes("+") ? row.minute : `${row.minute}Z`);
    const m = minutes.get(at) || { requests: 0, errors: 0, waiting: 0, kv: 0, p50: null, p99: null };
    m.requests += row.requests;
    m.errors += row.errors;
    m.waiting += row.waiting_avg;
    m.kv = Math.max(m.kv, row.kv_cache_usage_max);
    if (row.ttft_p50_ms !== null) m.p50 = Math.max(m.p50 ?? 0, row.ttft_p50_ms);
    if (row.ttft_p99_ms !== null) m.p99 = Math.max(m.p99 ?? 0, row.ttft_p99_ms);
    minutes.set(at, m);
  }
  const points = [...minutes.entries()].sort((a, b) => a[0] - b[0]);
  const series = (pick) => points.filter(([, m]) => pick(m) !== null).map(([at, m]) => [at, pick(m)]);
  main.append(
    h("h1", {}, "Overview"),
    h("div", { class: "grid" }, Object.entries(health.engines).map(([name, engine]) =>
      h("div", { class: "card" }, h("div", {}, h("strong", {}, name), " ", stateBadge(engine.state)),
        h("div", { class: "muted" }, engine.reasons.length ? engine.reasons.join("; ") : "No warning signs."),
        h("div", { class: "muted" }, `running ${fmt(engine.inputs.running, 1)}, waiting ${fmt(engine.inputs.queue_depth, 1)}, `
          + `KV cache ${fmt((engine.inputs.kv_cache_usage ?? 0) * 100, 1)} %`)))),
    h("p", { class: "muted" }, `Overall: ${health.state} (signal over the last ${health.window_s} s). Charts: the last hour, per minute.`),
    h("div", { class: "grid" },
      lineChart("Requests per second", [{ name: "requests/s", color: "#1f5fbf", points: series((m) => m.requests / 60) }], "req/s"),
      lineChart("Time to first token", [
        { name: "P50", color: "#1f7a3d", points: series((m) => m.p50) },
        { name: "P99", color: "#b3261e", points: series((m) => m.p99) },
      ], "ms"),
      lineChart("Queue depth", [{ name: "waiting", color: "#a86400", points: series((m) => m.waiting) }], "requests"),
      lineChart("KV-cache usage", [{ name: "KV cache", color: "#6a3fb5", points: series((m) => m.kv * 100) }], "%"),
      lineChart("Error rate", [{ name: "5xx", color: "#b3261e",
        points: series((m) => (m.requests ? (100 * m.errors) / m.requests : 0)) }], "%"),
    ),
  );
}

// ---- Models ------------------------------------------------------------------------------------------------
export async function models(main, session, rerender) {
  const since = iso(Date.now() - 24 * hour);
  const [served, ready, health, usage, registry] = await Promise.all([
    list("/v1/models"),
    fetch("/readyz").then((r) => r.json()),
    api("/admin/health/concurrency"),
    list(`/admin/usage/?group_by=model&from=${encodeURIComponent(since)}`),
    api("/admin/models/"),
  ]);
  const used = new Map(usage.map((row) => [row.group, row]));
  main.append(h("h1", {}, "Models"), table(
    [
      { label: "Model", value: (m) => m.id },
      { label: "Kind", value: (m) => (ready.engines.find((e) => e.model === m.id)?.runner === "pooling" ? "embeddings" : "chat, completions") },
      { label: "Engines", value: (m) => ready.engines.filter((e) => e.model === m.id)
        .map((e) => h("div", {}, `${e.url} `, e.healthy ? h("span", { class: "state-healthy" }, "up") : h("span", { class: "state-collapsing" }, `down (${e.error})`))) },
      { label: "Concurrency", value: (m) => Object.values(health.engines).filter((e) => e.model === m.id).map((e) => stateBadge(e.state)) },
      { label: "Requests (24 h)", num: true, value: (m) => fmt(used.get(m.id)?.requests ?? 0) },
      { label: "Tokens (24 h)", num: true, value: (m) => fmt(used.get(m.id)?.total_tokens ?? 0) },
      { label: "Cost (24 h)", num: true, value: (m) => fmt(used.get(m.id)?.cost ?? 0, 6) },
    ],
    served,
    "No model is served: start the appliance's engines.",
  ), registryVersions(registry, session, rerender));
}

// The model registry: every imported version, its state and history, checksums and serving options; admins
// approve, deploy, roll back, retire and remove files (every action is in the audit trail).
function registryVersions(registry, session, rerender) {
  const admin = session.roles.includes("admin");
  const act = (label, path, method = "POST", question = null) => h("button", { type: "button", onclick: async (event) => {
    if (question && !window.confirm(question)) return;
    event.target.disabled = true;
    try {
      await api(path, { method });
      rerender();
    } catch (error) {
      event.target.after(h("span", { class: "error", role: "alert" }, ` ${error.message}`));
      event.target.disabled = false;
    }
  } }, label);
  const actions = (v) => !admin ? [] : [
    v.state === "imported" && act("Approve", `/admin/models/${v.id}/approve`),
    v.state === "approved" && !v.files_removed && act("Deploy", `/admin/models/${v.id}/deploy`, "POST",
      `Deploy ${v.served_name} v${v.version}? Its engines start, then ${v.served_name} switches to them.`),
    v.serving && registry.served.some((s) => s.served_name === v.served_name && s.previous_version_id) &&
      act("Roll back", `/admin/models/served/${v.served_name}/rollback`, "POST", `Point ${v.served_name} back at its previous version?`),
    !["deployed", "retired"].includes(v.state) && act("Retire", `/admin/models/${v.id}/retire`, "POST", `Retire ${v.served_name} v${v.version}?`),
    v.state === "retired" && !v.files_removed && confirmButton("Remove files", `Delete the files of ${v.served_name} v${v.version}?`,
      async () => { await api(`/admin/models/${v.id}/files`, { method: "DELETE" }); rerender(); }),
  ].filter(Boolean);
  const details = (v) => h("details", {}, h("summary", {}, "files, history"),
    h("pre", {}, JSON.stringify({ options: v.options }, null, 1)),
    h("button", { type: "button", onclick: async (event) => {
      const full = await api(`/admin/models/${v.id}`);
      event.target.replaceWith(h("pre", {}, [
        ...full.files.map((f) => `${f.sha256}  ${fmt(f.size)} B  ${f.path}`), "",
        ...full.transitions.map((t) => `${t.at}  ${t.action}: ${t.from_state ?? "-"} -> ${t.to_state}  by ${t.actor}`),
      ].join("\n")));
    } }, "Show checksums and history"));
  return section("Registry versions", table(
    [
      { label: "Served name", value: (v) => v.served_name },
      { label: "Version", num: true, value: (v) => `v${v.version}` },
      { label: "State", value: (v) => [stateBadge(v.state), v.serving ? " (serving)" : "", v.files_removed ? " (files removed)" : ""] },
      { label: "Architecture", value: (v) => `${v.architecture} (${v.runner}, ${v.engine_kind})` },
      { label: "Parameters", num: true, value: (v) => fmt(v.param_count) },
      { label: "Context", num: true, value: (v) => fmt(v.options.context_length ?? v.context_length) },
      { label: "Size (MB)", num: true, value: (v) => fmt(v.size / 1e6, 1) },
      { label: "Imported", value: (v) => `${v.imported_by}, ${v.imported_at.slice(0, 16)}` },
      { label: "Approved", value: (v) => (v.approved_by ? `${v.approved_by}, ${v.approved_at.slice(0, 16)}` : "") },
      { label: "Details", value: details },
      { label: "", value: (v) => h("div", {}, ...actions(v)) },
    ],
    registry.data,
    "No version imported: `appliance models import FOLDER --name NAME`.",
  ));
}

// ---- Tenants, workflows, agents, API keys --------------------------------------------------------------------
export async function identity(main, session, rerender) {
  const admin = session.roles.includes("admin");
  const [tenants, workflows, agents, keys] = await Promise.all(
    ["tenants", "workflows", "agents", "api-keys"].map((kind) => listAll(`/admin/${kind}`)),
  );
  const tenantName = new Map(tenants.map((t) => [t.id, t.name]));
  const workflowName = new Map(workflows.map((w) => [w.id, w.name]));
  const remove = (kind, row) => admin && confirmButton("Delete", `Delete ${row.name || row.id}? Everything under it goes too.`,
    async () => { await api(`/admin/${kind}/${row.id}`, { method: "DELETE" }); rerender(); });
  const rename = (kind, row) => admin && form([{ name: "name", label: "New name", required: true, value: row.name }], "Rename",
    async (values) => { await api(`/admin/${kind}/${row.id}`, { method: "PATCH", json: { name: values.name } }); rerender(); });
  const secret = h("div", { "aria-live": "polite" });
  main.append(
    h("h1", {}, "Tenants, workflows, agents and API keys"),
    section("Tenants",
      table([
        { label: "Name", value: (t) => t.name }, { label: "Id", value: (t) => t.id },
        { label: "Description", value: (t) => t.description }, { label: "", value: (t) => [rename("tenants", t), remove("tenants", t)] },
      ], tenants, "No tenant yet: create the first one below."),
      admin && form([{ name: "name", label: "Tenant name", required: true }, { name: "description", label: "Description" }],
        "Create tenant", async (v) => { await api("/admin/tenants", { method: "POST", json: v }); rerender(); })),
    section("Workflows",
      table([
        { label: "Name", value: (w) => w.name }, { label: "Tenant", value: (w) => tenantName.get(w.tenant_id) },
        { label: "Id", value: (w) => w.id }, { label: "", value: (w) => [rename("workflows", w), remove("workflows", w)] },
      ], workflows, tenants.length ? "No workflow yet: create one for a tenant below." : "Create a tenant first."),
      admin && tenants.length > 0 && form([
        { name: "tenant_id", label: "Tenant", type: "select", options: tenants.map((t) => [t.id, t.name]) },
        { name: "name", label: "Workflow name", required: true },
      ], "Create workflow", async (v) => { await api("/admin/workflows", { method: "POST", json: v }); rerender(); })),
    section("Agents",
      table([
        { label: "Name", value: (a) => a.name }, { label: "Workflow", value: (a) => workflowName.get(a.workflow_id) },
        { label: "Id", value: (a) => a.id }, { label: "", value: (a) => [rename("agents", a), remove("agents", a)] },
      ], agents, "No agent yet: agents are optional; create one to attribute a workflow's calls."),
      admin && workflows.length > 0 && form([
        { name: "workflow_id", label: "Workflow", type: "select", options: workflows.map((w) => [w.id, `${tenantName.get(w.tenant_id)} / ${w.name}`]) },
        { name: "name", label: "Agent name", required: true },
      ], "Create agent", async (v) => { await api("/admin/agents", { method: "POST", json: v }); rerender(); })),
    section("API keys",
      secret,
      table([
        { label: "Name", value: (k) => k.name || "–" }, { label: "Id", value: (k) => k.id },
        { label: "Workflow", value: (k) => workflowName.get(k.workflow_id) }, { label: "Scopes", value: (k) => k.scopes.join(", ") },
        { label: "State", value: (k) => (k.revoked_at ? "revoked" : "active") },
        { label: "", value: (k) => admin && !k.revoked_at && confirmButton("Revoke", `Revoke key ${k.id}? Clients using it stop working.`,
          async () => { await api(`/admin/api-keys/${k.id}`, { method: "DELETE" }); rerender(); }) },
      ], keys, "No API key yet: create one for a workflow below."),
      admin && workflows.length > 0 && form([
        { name: "workflow_id", label: "Workflow", type: "select", options: workflows.map((w) => [w.id, `${tenantName.get(w.tenant_id)} / ${w.name}`]) },
        { name: "agent_id", label: "Agent (optional)", type: "select", options: [["", "none"], ...agents.map((a) => [a.id, `${workflowName.get(a.workflow_id)} / ${a.name}`])] },
        { name: "name", label: "Key name" },
      ], "Create key", async (v) => {
        const created = await api("/admin/api-keys", { method: "POST", json: { ...v, agent_id: v.agent_id || null } });
        secret.replaceChildren(h("div", { class: "notice" }, h("p", {}, "The new key, shown this once: copy it now."),
          h("div", { class: "secret", "data-testid": "new-key" }, created.key)));
        const rows = await listAll("/admin/api-keys");
        keys.splice(0, keys.length, ...rows);
      })),
  );
}

// ---- Budgets -----------------------------------------------------------------------------------------------
export async function budgets(main, session, rerender) {
  const admin = session.roles.includes("admin");
  const [status, tenants, workflows, agents] = await Promise.all([
    api("/admin/budgets/"), listAll("/admin/tenants"), listAll("/admin/workflows"), listAll("/admin/agents"),
  ]);
  const names = new Map([...tenants, ...workflows, ...agents].map((row) => [row.id, row.name]));
  const bar = (b) => {
    if (b.used === undefined) return h("span", { class: "muted" }, "per call");
    const share = b.limit ? Math.min(1, (b.used + b.reserved) / b.limit) : 1;
    return h("div", {}, h("div", { class: share >= 1 ? "bar full" : "bar", role: "img",
      "aria-label": `${fmt(b.used, 6)} of ${fmt(b.limit, 6)} used` }, h("span", { style: { width: `${(share * 100).toFixed(1)}%` } })),
      h("span", { class: "muted" }, `${fmt(b.used, 6)} used of ${fmt(b.limit, 6)}${b.kind === "cost" ? ` ${status.currency}` : ""}`));
  };
  main.append(h("h1", {}, "Budgets"), table([
    { label: "Scope", value: (b) => `${b.scope_type} ${names.get(b.scope_id) || b.scope_id}` },
    { label: "Kind", value: (b) => b.kind }, { label: "Period", value: (b) => b.period },
    { label: "Used", value: bar },
    { label: "Resets", value: (b) => (b.resets_at ? new Date(b.resets_at).toLocaleString() : "–") },
    { label: "", value: (b) => admin && form([{ name: "limit", label: "New limit", type: "number", min: 0, step: "any", value: b.limit }],
      "Change", async (v) => { await api(`/admin/budgets/${b.id}`, { method: "PATCH", json: { limit: Number(v.limit) } }); rerender(); }) },
  ], status.data, "No budget yet: without one, calls are limited only by admission control."));
  if (!admin) return;
  const scopes = [
    ...tenants.map((t) => [`tenant:${t.id}`, `tenant ${t.name}`]),
    ...workflows.map((w) => [`workflow:${w.id}`, `workflow ${w.name}`]),
    ...agents.map((a) => [`agent:${a.id}`, `agent ${a.name}`]),
  ];
  main.append(section("New budget", scopes.length ? form([
    { name: "scope", label: "Scope", type: "select", options: scopes },
    { name: "kind", label: "Kind", type: "select", options: ["tokens", "requests", "cost", "max_tokens", "max_retries", "max_depth"].map((k) => [k, k]) },
    { name: "limit", label: "Limit", type: "number", min: 0, step: "any", required: true },
    { name: "period", label: "Period", type: "select", options: ["day", "hour", "month", "none"].map((p) => [p, p]) },
  ], "Create budget", async (v) => {
    const [scope_type, scope_id] = v.scope.split(":");
    await api("/admin/budgets/", { method: "POST", json: { scope_type, scope_id, kind: v.kind, limit: Number(v.limit), period: v.period } });
    rerender();
  }) : empty("Create a tenant first: budgets belong to a tenant, workflow or agent.")));
}

// ---- Usage and cost ------------------------------------------------------------------------------------------
export async function usage(main) {
  const result = h("div", {});
  const today = new Date();
  const named = await Promise.all(["tenants", "workflows", "agents", "api-keys"].map((kind) => listAll(`/admin/${kind}`)));
  const names = new Map(named.flat().map((row) => [row.id, row.name || row.id]));
  const show = async (v) => {
    result.replaceChildren(loading("Reading usage"));
    const query = new URLSearchParams({ group_by: v.group_by, from: `${v.from}T00:00:00Z`, to: `${v.to}T23:59:59Z` });
    const report = await api(`/admin/usage/?${query}`);
    const rows = report.data.map((row) => ({ ...row, group: row.group === null ? null : names.get(row.group) ?? row.group }));
    result.replaceChildren(
      h("div", { class: "grid" },
        barChart(`Cost by ${v.group_by}`, rows.map((r) => ({ label: r.group ?? "none", value: r.cost })), report.currency),
        barChart(`Tokens by ${v.group_by}`, rows.map((r) => ({ label: r.group ?? "none", value: r.total_tokens })), "tokens")),
      table([
        { label: v.group_by, value: (r) => r.group ?? "none" },
        { label: "Requests", num: true, value: (r) => fmt(r.requests) }, { label: "Refused", num: true, value: (r) => fmt(r.refused) },
        { label: "Errors", num: true, value: (r) => fmt(r.errors) }, { label: "Tokens", num: true, value: (r) => fmt(r.total_tokens) },
        { label: `Cost (${report.currency})`, num: true, value: (r) => fmt(r.cost, 6) },
        { label: "Retry rate", num: true, value: (r) => `${fmt(r.retry_rate * 100, 1)} %` },
        { label: "Latency P50 / P99 ms", num: true, value: (r) => `${fmt(r.latency_p50_ms)} / ${fmt(r.latency_p99_ms)}` },
        { label: "TTFT P50 / P99 ms", num: true, value: (r) => `${fmt(r.ttft_p50_ms)} / ${fmt(r.ttft_p99_ms)}` },
      ], rows, "No request in this period."),
      h("p", {}, h("a", { href: `/admin/usage/?${query}&format=csv`, download: "usage.csv" }, "Export as CSV")),
    );
  };
  const defaults = { group_by: "tenant", from: day(new Date(today - 7 * 24 * hour)), to: day(today) };
  main.append(h("h1", {}, "Usage and cost"), form([
    { name: "group_by", label: "Group by", type: "select", options: ["tenant", "workflow", "agent", "model", "key"].map((g) => [g, g]) },
    { name: "from", label: "From", type: "date", value: defaults.from, required: true },
    { name: "to", label: "To", type: "date", value: defaults.to, required: true },
  ], "Show", show), result);
  await show(defaults);
}

// ---- Audit -------------------------------------------------------------------------------------------------------
export async function audit(main, session) {
  const result = h("div", {});
  const verdict = h("div", { "aria-live": "polite" });
  let records = [];
  const search = async (v) => {
    result.replaceChildren(loading("Searching"));
    const query = new URLSearchParams({ limit: "200" });
    for (const key of ["subject", "event_type", "outcome"]) if (v[key]) query.set(key, v[key]);
    if (v.since) query.set("since", `${v.since}T00:00:00Z`);
    const found = await api(`/admin/audit/?${query}`);
    records = found.data;
    result.replaceChildren(h("p", { class: "muted" }, `${fmt(found.total)} records match; the newest 200 are shown.`), table([
      { label: "Time", value: (r) => new Date(r.ts).toLocaleString() }, { label: "Event", value: (r) => r.event_type },
      { label: "Outcome", value: (r) => r.outcome }, { label: "Subject", value: (r) => r.subject ?? "–" },
      { label: "Object", value: (r) => [r.object_type, r.object_id].filter(Boolean).join(" ") },
      { label: "Request", value: (r) => r.request_id ?? "–" },
    ], records, "No record matches: widen the search."),
    h("button", { type: "button", class: "secondary", onclick: () =>
      download("audit-records.jsonl", records.map((r) => JSON.stringify(r)).join("\n") + "\n", "application/x-ndjson") }, "Export these records"));
  };
  main.append(h("h1", {}, "Audit log"),
    session.tenant_id === null && section("Chain verification", h("p", { class: "muted" },
      "Checks every record's hash link and every signed checkpoint."),
      h("button", { type: "button", onclick: async (event) => {
        event.target.disabled = true;
        verdict.replaceChildren(loading("Verifying the chain"));
        try {
          const result = await api("/admin/audit/verify");
          verdict.replaceChildren(h("p", { class: result.ok ? "state-healthy" : "state-collapsing", "data-testid": "verify-result" },
            result.ok ? `Chain intact: ${fmt(result.records)} records, ${fmt(result.checkpoints)} checkpoints verified.`
              : `Chain broken at record ${result.first_bad_seq}: ${result.reason}`));
        } catch (error) {
          verdict.replaceChildren(h("p", { class: "error", role: "alert" }, error.message));
        } finally {
          event.target.disabled = false;
        }
      } }, "Verify the chain"), verdict),
    section("Search", form([
      { name: "since", label: "Since", type: "date" }, { name: "subject", label: "Subject" },
      { name: "event_type", label: "Event type" },
      { name: "outcome", label: "Outcome", type: "select", options: [["", "any"], ["success", "success"], ["denied", "denied"], ["failure", "failure"]] },
    ], "Search", search), result));
  await search({});
}

// ---- Retrieval -----------------------------------------------------------------------------------------------------
export async function retrieval(main, session, rerender) {
  const admin = session.roles.includes("admin");
  const [collections, tenants] = await Promise.all([list("/v1/rag/collections"), admin ? listAll("/admin/tenants") : []]);
  main.append(h("h1", {}, "Retrieval"), table([
    { label: "Collection", value: (c) => c.name }, { label: "Tenant", value: (c) => c.tenant_id },
    { label: "Documents", num: true, value: (c) => fmt(c.documents) }, { label: "Chunks", num: true, value: (c) => fmt(c.chunks) },
    { label: "Upload a document", value: (c) => admin && form([{ name: "file", label: "Text, Markdown, HTML or PDF", type: "file", required: true,
      accept: ".txt,.md,.markdown,.html,.htm,.pdf" }], "Upload", async (v) => {
      const data = new FormData();
      data.append("file", v.file);
      await api(`/v1/rag/collections/${c.id}/documents`, { method: "POST", form: data });
      rerender();
    }) },
  ], collections, "No collection yet: create one, then upload documents to it."));
  if (admin) {
    main.append(section("New collection", tenants.length ? form([
      { name: "tenant_id", label: "Tenant", type: "select", options: tenants.map((t) => [t.id, t.name]) },
      { name: "name", label: "Collection name", required: true }, { name: "description", label: "Description" },
    ], "Create collection", async (v) => { await api("/v1/rag/collections", { method: "POST", json: v }); rerender(); })
      : empty("Create a tenant first: collections belong to a tenant.")));
  }
}

// ---- Playground ------------------------------------------------------------------------------------------------------
export async function playground(main) {
  const served = await list("/v1/models");
  const ready = await fetch("/readyz").then((r) => r.json());
  const generative = served.filter((m) => ready.engines.some((e) => e.model === m.id && e.runner === "generate"));
  const output = h("div", { class: "output", "aria-live": "polite", "data-testid": "answer" });
  const figures = h("p", { class: "muted", "data-testid": "answer-usage" });
  main.append(h("h1", {}, "Playground"), h("p", { class: "muted" }, "Chat with a model through the gateway as yourself: "
    + "budgets, admission and the audit log apply as to any caller."),
  generative.length ? form([
    { name: "model", label: "Model", type: "select", options: generative.map((m) => [m.id, m.id]) },
    { name: "max_tokens", label: "Max tokens", type: "number", min: 1, value: 64 },
    { name: "prompt", label: "Message", type: "textarea", required: true },
  ], "Send", async (v) => {
    output.textContent = "";
    figures.replaceChildren(loading("Answering"));
    let usage = null;
    const headers = await stream("/v1/chat/completions", {
      model: v.model, max_tokens: Number(v.max_tokens) || 64, stream: true, stream_options: { include_usage: true },
      messages: [{ role: "user", content: v.prompt }],
    }, (chunk) => {
      for (const choice of chunk.choices || []) output.append(choice.delta?.content ?? "");
      if (chunk.usage) usage = chunk.usage;
    });
    const requestId = headers.get("x-request-id");
    let cost = null;
    for (let attempt = 0; attempt < 10 && cost === null; attempt += 1) {
      const rows = await list("/admin/usage/requests?limit=50").catch(() => []);
      const row = rows.find((r) => r.request_id === requestId);
      if (row) cost = row.cost;
      else await new Promise((resolve) => setTimeout(resolve, 300));
    }
    figures.textContent = usage
      ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens; cost ${cost === null ? "not recorded yet" : fmt(cost, 6)}; request ${requestId}`
      : `request ${requestId}`;
  }, { inline: false }) : empty("No chat model is served."), h("h2", {}, "Answer"), output, figures);
}

// ---- Placement ---------------------------------------------------------------------------------------------
const pct = (value) => (value === null || value === undefined ? "-" : `${fmt(value * 100, 1)} %`);
const columns = (labels) => labels.map((label, index) => ({ label, value: (row) => row[index] }));
const dayPoints = (rows, scale = 1) => rows.map(([d, value]) => [Date.parse(`${d}T00:00:00Z`), value * scale]);

export async function placement(main) {
  const report = await api("/admin/placement/");
  const long = report.windows["90d"];
  const short = report.windows["30d"];
  const util = (w) => w.utilisation;
  const figures = (name, w) => [name, pct(util(w).mean), pct(util(w).consistent), util(w).pattern ?? "-",
    pct(util(w).share_at_or_above_high), fmt(w.tokens.total, 0),
    w.tokens.change_per_30_days === null ? "-" : `${fmt(w.tokens.change_per_30_days * 100, 1)} %`,
    w.cost.on_prem_per_million === null || w.cost.on_prem_per_million === undefined ? "-"
      : `${fmt(w.cost.on_prem_per_million, 4)} ${report.currency}`];
  const alternatives = Object.entries(long.cost.alternatives || {}).map(([name, price]) =>
    ({ label: name, value: price.per_million }));
  if (long.cost.on_prem_per_million !== null && long.cost.on_prem_per_million !== undefined) {
    alternatives.unshift({ label: "this node", value: long.cost.on_prem_per_million });
  }
  main.append(
    h("h1", {}, "Placement"),
    section(`Verdict: ${report.verdict}`, h("p", { "data-testid": "placement-verdict" }, report.reason),
      h("p", { class: "muted" }, `Utilisation from ${report.utilisation_source}; ${report.observed_days} days observed. `
        + `Thresholds: ${pct(report.thresholds.low_utilisation)} / ${pct(report.thresholds.high_utilisation)}, `
        + `consistent = reached in ${pct(report.thresholds.consistent_share)} of hours, sustained ${report.thresholds.sustained_days} days.`)),
    section("Variables", table(columns(["window", "mean", "consistent", "pattern", "hours >= high", "tokens",
      "trend / 30 d", "on-prem per 1M tokens"]), [figures("30 days", short), figures("90 days", long)], "No telemetry yet.")),
    h("div", { class: "grid" },
      lineChart("Utilisation per day", [{ name: "utilisation", color: "#1f5fbf", points: dayPoints(long.utilisation_per_day, 100) }], "%"),
      lineChart("Tokens per day", [{ name: "tokens", color: "#1f7a3d", points: dayPoints(long.tokens.per_day) }], "tokens"),
      barChart(`Cost per 1M tokens (${report.currency})`, alternatives, report.currency)),
    section("Reassessment triggers", table(columns(["trigger", "what", "now", "threshold", "fired"]),
      report.triggers.map((t) => [t.name, t.description, JSON.stringify(t.value), JSON.stringify(t.threshold),
        t.fired ? h("strong", { class: "state-degrading" }, "fired") : "no"]), "None.")),
  );
}

// ---- Drift -------------------------------------------------------------------------------------------------
export async function drift(main) {
  const show = async (window) => {
    const report = await api(`/admin/drift/?window=${window}`);
    const rows = report.findings.map((f) => [f.scope, f.id, f.signal, f.test, fmt(f.statistic, 3),
      String(f.baseline), String(f.recent), f.summary]);
    return [
      h("p", { class: "muted" }, `The last ${window} (${report.recent[0]} to ${report.recent[1]}) against the week before; `
        + `${report.groups.length} groups compared, ${report.rows_read} requests read.`),
      table(columns(["scope", "id", "signal", "test", "statistic", "baseline", "recent", "finding"]), rows,
        "No drift: every compared group behaves as in its baseline."),
      barChart("Test statistic of each finding", report.findings.map((f) =>
        ({ label: `${f.scope} ${f.id} ${f.signal}`, value: Math.abs(f.statistic) })), ""),
    ];
  };
  const body = h("div", { "data-testid": "drift-findings" }, ...(await show("day")));
  main.append(h("h1", {}, "Behavioural drift"),
    form([{ name: "window", label: "Window", type: "select", options: [["day", "day"], ["hour", "hour"]] }], "Compare", async (values) => {
      body.replaceChildren(...(await show(values.window)));
    }),
    section("Findings", body));
}
