// Manifold Merge: front-end behaviour of the node pack (ComfyUI serves this folder as the pack's WEB_DIRECTORY).
//
// Everything here is driven by the node definitions (/object_info): an input's options may carry a "manifold"
// entry written by nodes/merge_nodes.py and nodes/lora_nodes.py, so no merge method is named in this file.
//   {"method_widgets": {method: [widget, ...]}}  on a method picker: show only the chosen method's widgets
//   {"grow": true}                                on an optional model socket: added when the one before is used
//   {"with": "model3"}                            on a per-model widget: shown while its socket is there
//   {"narrow_by": "hyper_set"}                    on a "SET / MODEL" drop-down: list only the chosen set's entries
// and optional checkpoint pickers ckpt_3..ckpt_N starting with "(none)" appear one at a time.
//
// Hiding never removes a widget: hidden widgets keep their values and the order of widgets_values, so saved
// workflows load and queue exactly as before. Sockets are removed only while unconnected (optional ones).
import { app } from "../../scripts/app.js";

const KEY = "manifold";
const NONE = "(none)";
const SEP = " / ";
const INPUT = 1; // LiteGraph.INPUT
const HOLLOW_CIRCLE = 7; // RenderShape.HollowCircle: how ComfyUI draws optional sockets

function hint(spec) {
  const opts = Array.isArray(spec) ? spec[1] : null;
  return opts && typeof opts === "object" && opts[KEY] && typeof opts[KEY] === "object" ? opts[KEY] : null;
}

/** What the node definition asks for: {sockets, follows, methodInput, methodWidgets, pickers, narrow}. */
export function describe(nodeData) {
  const required = nodeData?.input?.required ?? {};
  const optional = nodeData?.input?.optional ?? {};
  const all = { ...required, ...optional };
  const order = nodeData?.input_order
    ? [...(nodeData.input_order.required ?? []), ...(nodeData.input_order.optional ?? [])]
    : Object.keys(all);
  const d = { order, sockets: [], follows: {}, methodInput: null, methodWidgets: null, pickers: [], narrow: {} };
  for (const name of order) {
    const spec = all[name];
    const h = hint(spec);
    if (h?.grow) d.sockets.push({ name, type: spec[0] });
    if (h?.with) d.follows[name] = h.with;
    if (h?.method_widgets) {
      d.methodInput = name;
      d.methodWidgets = h.method_widgets;
    }
    if (h?.narrow_by) d.narrow[name] = { by: h.narrow_by, values: Array.isArray(spec[0]) ? [...spec[0]] : [] };
    if (name in optional && /^ckpt_\d+$/.test(name) && Array.isArray(spec?.[0]) && spec[0][0] === NONE) {
      d.pickers.push(name);
    }
  }
  d.active = d.sockets.length || d.methodWidgets || d.pickers.length || Object.keys(d.narrow).length;
  return d;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function inputIndex(node, name) {
  return node.inputs ? node.inputs.findIndex((i) => i.name === name) : -1;
}

function isWidgetSlot(input) {
  return !!input?.widget;
}

function linkOf(node, id) {
  const links = node.graph?._links ?? node.graph?.links;
  if (!links) return null;
  return typeof links.get === "function" ? links.get(id) : links[id];
}

/** After inputs moved: every link's target slot is its input's index again. */
function relink(node) {
  node.inputs.forEach((input, i) => {
    if (input.link == null) return;
    const link = linkOf(node, input.link);
    if (link) link.target_slot = i;
  });
  node._setConcreteSlots?.();
}

/** Moves input `from` to `to`, keeping every link's target slot right. */
function moveInput(node, from, to) {
  if (from === to) return;
  const [slot] = node.inputs.splice(from, 1);
  node.inputs.splice(to, 0, slot);
  relink(node);
}

/** Sockets (not widget inputs) in the definition's order, e.g. after loading a workflow whose node listed
 * only its connected inputs; widget inputs keep their places (they are drawn at their widgets). */
function sortSockets(node, d) {
  const rank = (input) => {
    const r = d.order.indexOf(input.name);
    return r < 0 ? Number.MAX_SAFE_INTEGER : r;
  };
  const places = [];
  node.inputs.forEach((input, i) => isWidgetSlot(input) || places.push(i));
  const now = places.map((i) => node.inputs[i]);
  const sorted = [...now].sort((a, b) => rank(a) - rank(b));
  if (sorted.every((input, k) => input === now[k])) return false;
  places.forEach((i, k) => (node.inputs[i] = sorted[k]));
  relink(node);
  return true;
}

/** Adds a growing socket where its definition puts it (before the next socket present in the definition). */
function addSocket(node, d, socket) {
  node.addInput(socket.name, socket.type, { shape: HOLLOW_CIRCLE, localized_name: socket.name });
  const rank = d.order.indexOf(socket.name);
  const from = node.inputs.length - 1;
  const to = node.inputs.findIndex(
    (input, i) => i !== from && !isWidgetSlot(input) && d.order.indexOf(input.name) > rank,
  );
  if (to >= 0) moveInput(node, from, to);
}

/** Connected growing sockets stay, plus one free one after the last connected; the others go. */
function updateSockets(node, d) {
  if (!d.sockets.length) return false;
  let last = -1;
  d.sockets.forEach((s, k) => {
    const i = inputIndex(node, s.name);
    if (i >= 0 && node.inputs[i].link != null) last = k;
  });
  let changed = false;
  d.sockets.forEach((s, k) => {
    const i = inputIndex(node, s.name);
    const wanted = k <= last + 1;
    if (!wanted && i >= 0 && node.inputs[i].link == null) {
      node.removeInput(i);
      changed = true;
    } else if (wanted && i < 0) {
      addSocket(node, d, s);
      changed = true;
    }
  });
  return sortSockets(node, d) || changed;
}

/** Names of the widgets to hide now, out of the ones this script controls (returned as `controlled`). */
function hiddenWidgets(node, d) {
  const controlled = new Set();
  const hide = new Set();
  if (d.methodWidgets) {
    const method = widget(node, d.methodInput)?.value;
    const mine = d.methodWidgets[method];
    for (const names of Object.values(d.methodWidgets)) names.forEach((n) => controlled.add(n));
    if (Array.isArray(mine)) for (const n of controlled) if (!mine.includes(n)) hide.add(n);
  }
  for (const [name, socket] of Object.entries(d.follows)) {
    controlled.add(name);
    if (inputIndex(node, socket) < 0) hide.add(name);
  }
  if (d.pickers.length) {
    let last = -1;
    d.pickers.forEach((name, k) => {
      const v = widget(node, name)?.value;
      if (v != null && v !== NONE) last = k;
    });
    d.pickers.forEach((name, k) => {
      controlled.add(name);
      if (k > last + 1) hide.add(name);
    });
  }
  return { controlled, hide };
}

function setHidden(node, w, hidden) {
  let changed = false;
  for (const linked of w.linkedWidgets ?? []) changed = setHidden(node, linked, hidden) || changed; // e.g. a seed's
  if (!!w.hidden === hidden) return changed;
  if (hidden) {
    w.hidden = true;
    w.__manifoldSize = Object.prototype.hasOwnProperty.call(w, "computeSize") ? w.computeSize : null;
    w.computeSize = () => [0, -4]; // no room in the layout
  } else {
    w.hidden = false;
    if (w.__manifoldSize) w.computeSize = w.__manifoldSize;
    else delete w.computeSize;
    delete w.__manifoldSize;
  }
  return true;
}

function updateWidgets(node, d) {
  const { controlled, hide } = hiddenWidgets(node, d);
  let changed = false;
  for (const w of node.widgets ?? []) {
    if (!controlled.has(w.name)) continue;
    const fed = inputIndex(node, w.name) >= 0 && node.inputs[inputIndex(node, w.name)].link != null;
    changed = setHidden(node, w, hide.has(w.name) && !fed) || changed;
  }
  return changed;
}

/** "SET / MODEL" drop-downs list the entries of the chosen SET (and entries without a set, e.g. "none"). */
function updateNarrowed(node, d) {
  for (const [name, { by, values }] of Object.entries(d.narrow)) {
    const w = widget(node, name);
    const set = widget(node, by)?.value;
    if (!w || set == null) continue;
    const known = new Set(values);
    for (const v of w.options?.values ?? []) if (!known.has(v)) values.push(v), known.add(v); // after a refresh
    const shown = values.filter((v) => !v.includes(SEP) || v.startsWith(set + SEP));
    w.options = { ...(w.options ?? {}), values: shown };
    const value = String(w.value ?? "");
    if (value.includes(SEP) && !value.startsWith(set + SEP)) {
      w.value = shown.find((v) => v.startsWith(set + SEP)) ?? shown[0] ?? value;
    }
  }
}

export function refresh(node) {
  const d = node.constructor?.__manifold;
  if (!d) return;
  updateNarrowed(node, d);
  const changed = updateSockets(node, d) | updateWidgets(node, d);
  if (changed) {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), size[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

function watch(node, d) {
  const names = [d.methodInput, ...d.pickers, ...Object.values(d.narrow).map((n) => n.by)].filter(Boolean);
  for (const name of names) {
    const w = widget(node, name);
    if (!w || w.__manifoldWatched) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const result = callback?.apply(this, args);
      refresh(node);
      return result;
    };
    w.__manifoldWatched = true;
  }
}

function chain(proto, name, after) {
  const original = proto[name];
  proto[name] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

app.registerExtension({
  name: "ManifoldMerge.DynamicInputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const d = describe(nodeData);
    if (!d.active) return;
    nodeType.__manifold = d;
    chain(nodeType.prototype, "onNodeCreated", function () {
      watch(this, d);
      refresh(this);
    });
    chain(nodeType.prototype, "onConfigure", function () {
      watch(this, d);
      refresh(this);
    });
    chain(nodeType.prototype, "onConnectionsChange", function (type) {
      if (type !== INPUT || this.__manifoldPending) return;
      this.__manifoldPending = true; // after LiteGraph has finished (dis)connecting
      setTimeout(() => {
        this.__manifoldPending = false;
        if (this.graph) refresh(this);
      }, 0);
    });
  },
});
