// Small DOM helpers, forms that show the API's errors next to their field, tables and SVG charts.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value); // CSSOM: allowed by the page's style-src 'self'

    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children.flat()) if (child) node.append(child);
  return node;
}

export const loading = (what = "Loading") => h("p", { class: "loading", role: "status" }, `${what}…`);
export const empty = (text) => h("p", { class: "empty" }, text);
export const fmt = (value, digits = 0) =>
  value === null || value === undefined ? "–" : Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });

export function table(columns, rows, emptyText) {
  if (!rows.length) return empty(emptyText);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : null }, c.value(row)))))),
  );
}

let fieldCounter = 0;

// A labelled form. fields: [{name, label, type, options, required, value, min, step}]. onSubmit(values) may throw
// an ApiError: its message is shown next to the field it names (param), else under the form.
export function form(fields, submitLabel, onSubmit, { inline = true } = {}) {
  const errors = new Map();
  const general = h("p", { class: "error", role: "alert" });
  const controls = fields.map((field) => {
    const id = `f${++fieldCounter}`;
    let control;
    if (field.type === "select") {
      control = h("select", { id, name: field.name, required: field.required },
        field.options.map(([value, text]) => h("option", { value, selected: String(value) === String(field.value ?? "") }, text)));
    } else if (field.type === "textarea") {
      control = h("textarea", { id, name: field.name, required: field.required }, field.value ?? "");
    } else {
      control = h("input", { id, name: field.name, type: field.type || "text", required: field.required,
        value: field.value ?? null, min: field.min, step: field.step, accept: field.accept });
    }
    const message = h("span", { class: "error", id: `${id}-error`, "aria-live": "polite" });
    control.setAttribute("aria-describedby", `${id}-error`);
    errors.set(field.name, [control, message]);
    return h("label", { for: id }, field.label, control, message);
  });
  const button = h("button", { type: "submit" }, submitLabel);
  const node = h("form", { class: inline ? "inline" : null }, controls, button, general);
  node.addEventListener("submit", async (event) => {
    event.preventDefault();
    general.textContent = "";
    for (const [control, message] of errors.values()) {
      control.classList.remove("field-error");
      control.removeAttribute("aria-invalid");
      message.textContent = "";
    }
    const values = {};
    for (const field of fields) {
      const control = errors.get(field.name)[0];
      values[field.name] = field.type === "file" ? control.files[0] : control.value;
    }
    button.disabled = true;
    const label = button.textContent;
    button.textContent = "Working…";
    try {
      await onSubmit(values, node);
    } catch (error) {
      const target = error.param && errors.get(error.param);
      if (target) {
        target[0].classList.add("field-error");
        target[0].setAttribute("aria-invalid", "true");
        target[1].textContent = error.message;
        target[0].focus();
      } else {
        general.textContent = error.message || String(error);
      }
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });
  return node;
}

// A line chart of series [{name, color, points: [[x(ms), y]]}] with a y axis from 0.
export function lineChart(title, series, unit) {
  const width = 600, height = 160, left = 44, bottom = 18;
  const all = series.flatMap((s) => s.points);
  const box = h("figure", { class: "card chart" }, h("figcaption", {}, h("strong", {}, title)));
  if (!all.length) {
    box.append(empty("No data yet: roll-ups appear once an engine has been watched for a minute."));
    return box;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || x0 + 1;
  const top = Math.max(...ys, 0) * 1.1 || 1;
  const sx = (x) => left + ((x - x0) / Math.max(x1 - x0, 1)) * (width - left - 8);
  const sy = (y) => height - bottom - (y / top) * (height - bottom - 8);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${title} (${unit})` },
    svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, stroke: "#d9dee6" }),
    [0, 0.5, 1].map((f) => {
      const text = svg("text", { x: left - 4, y: sy(top * f) + 4, "text-anchor": "end", "font-size": 10, fill: "#5b6678" });
      text.textContent = fmt(top * f, top < 10 ? 2 : 0);
      return text;
    }),
    series.map((s) =>
      svg("polyline", { fill: "none", stroke: s.color, "stroke-width": 2,
        points: s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ") })),
  );
  const first = new Date(x0).toLocaleTimeString(), last = new Date(x1).toLocaleTimeString();
  box.append(chart, h("div", { class: "legend" }, series.map((s) => h("span", {}, h("i", { style: { background: s.color } }), s.name)),
    h("span", {}, `${first} – ${last}, ${unit}`)));
  return box;
}

// Horizontal bars: rows [{label, value}] scaled to the largest.
export function barChart(title, rows, unit) {
  const box = h("figure", { class: "card chart" }, h("figcaption", {}, h("strong", {}, title)));
  if (!rows.length) return box.append(empty("Nothing in this period.")), box;
  const top = Math.max(...rows.map((r) => r.value), 0) || 1;
  for (const row of rows) {
    box.append(h("div", { class: "muted" }, `${row.label}: ${fmt(row.value, 4)} ${unit}`),
      h("div", { class: "bar", role: "img", "aria-label": `${row.label} ${row.value} ${unit}` },
        h("span", { style: { width: `${((row.value / top) * 100).toFixed(1)}%` } })));
  }
  return box;
}

export function download(name, text, type = "application/json") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
