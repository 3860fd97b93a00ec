// Renders /openapi.json as a list of routes and schemas. Plain DOM code, no dependencies,
// so the page works on machines without internet access.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
  children.forEach((c) => node.append(c));
  return node;
}

function json(value) {
  return el("pre", {}, JSON.stringify(value, null, 2));
}

function renderOperation(path, method, op) {
  const summary = el("summary", {},
    el("span", { class: "method " + method }, method), " ",
    el("span", { class: "path" }, path), " \u2014 ", op.summary || "");
  const body = el("div", {});
  if (op.requestBody) {
    body.append(el("h4", {}, "Request body"), json(op.requestBody.content));
  }
  body.append(el("h4", {}, "Responses"));
  Object.entries(op.responses || {}).forEach(([code, resp]) => {
    body.append(el("p", {}, el("b", {}, code), " ", resp.description || ""));
  });
  return el("details", {}, summary, body);
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  document.getElementById("description").textContent = spec.info.description || "";
  const routes = document.getElementById("routes");
  routes.replaceChildren();
  Object.entries(spec.paths).forEach(([path, item]) => {
    Object.entries(item).forEach(([method, op]) => routes.append(renderOperation(path, method, op)));
  });
  const schemas = document.getElementById("schemas");
  Object.entries(spec.components.schemas).forEach(([name, schema]) => {
    schemas.append(el("details", {}, el("summary", {}, name), json(schema)));
  });
}

main().catch((err) => {
  document.getElementById("routes").textContent = "Could not load /openapi.json: " + err;
});
