// The console shell: who is signed in, the sections their roles may use, and hash routing between them.
import { api, ApiError, setCsrf } from "./api.js";
import * as pages from "./pages.js";
import { h, loading } from "./ui.js";

const READERS = ["admin", "operator"];
const SECTIONS = [
  { path: "overview", title: "Overview", roles: READERS, render: pages.overview },
  { path: "models", title: "Models", roles: READERS, render: pages.models },
  { path: "identity", title: "Tenants & keys", roles: READERS, render: pages.identity },
  { path: "budgets", title: "Budgets", roles: READERS, render: pages.budgets },
  { path: "usage", title: "Usage & cost", roles: READERS, render: pages.usage },
  { path: "audit", title: "Audit", roles: ["admin", "auditor"], render: pages.audit },
  { path: "retrieval", title: "Retrieval", roles: READERS, render: pages.retrieval },
  { path: "placement", title: "Placement", roles: READERS, platform: true, render: pages.placement },
  { path: "drift", title: "Drift", roles: READERS, render: pages.drift },
  { path: "playground", title: "Playground", roles: ["admin", "operator", "user"], render: pages.playground },
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let session = null;

function allowed(section) {
  if (section.platform && session.tenant_id) return false; // about the whole node: platform principals only
  return section.roles.some((role) => session.roles.includes(role));
}

function signInPage(message) {
  nav.replaceChildren();
  who.replaceChildren();
  main.replaceChildren(h("h1", {}, "Sign in"), message && h("p", { class: "error", role: "alert" }, message),
    h("p", {}, "The console uses the appliance's identity provider."),
    h("p", {}, h("a", { href: "/console/login", class: "button", "data-testid": "sign-in" }, "Sign in")));
}

async function render() {
  const sections = SECTIONS.filter(allowed);
  const wanted = location.hash.replace(/^#\/?/, "") || sections[0]?.path;
  const section = sections.find((s) => s.path === wanted);
  nav.replaceChildren(...sections.map((s) =>
    h("a", { href: `#/${s.path}`, "aria-current": s === section ? "page" : null }, s.title)));
  if (!section) {
    main.replaceChildren(h("h1", {}, "Not available"), h("p", {}, sections.length
      ? "Your role does not include this section." : "Your role does not include any console section."));
    return;
  }
  document.title = `${section.title} · Appliance console`;
  main.replaceChildren(loading());
  const page = h("div", { "data-page": section.path });
  try {
    await section.render(page, session, render);
    main.replaceChildren(page);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return signInPage("Your session ended; sign in again.");
    main.replaceChildren(h("h1", {}, section.title), h("p", { class: "error", role: "alert" }, error.message || String(error)));
  }
  main.focus();
}

async function start() {
  try {
    session = await api("/console/session");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return signInPage();
    main.replaceChildren(h("p", { class: "error", role: "alert" }, error.message));
    return;
  }
  setCsrf(session.csrf_token);
  who.replaceChildren(h("span", {}, `${session.username} (${session.roles.join(", ")})`),
    h("button", { type: "button", onclick: async () => {
      await api("/console/logout", { method: "POST" }).catch(() => null);
      signInPage("You are signed out.");
    } }, "Sign out"));
  window.addEventListener("hashchange", render);
  await render();
}

start();
