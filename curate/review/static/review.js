// curate review: every click is one POST to /api/...; the page then reloads from the manifest.
"use strict";
(function () {
  const flash = document.getElementById("flash");
  const saved = sessionStorage.getItem("curate-flash");
  if (saved) {
    const { text, error } = JSON.parse(saved);
    sessionStorage.removeItem("curate-flash");
    show(text, error);
  }
  function show(text, error) {
    flash.textContent = text;
    flash.className = "show" + (error ? " error" : "");
  }
  async function post(name, body, reload = true) {
    let data;
    try {
      const resp = await fetch("/api/" + name, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}),
      });
      data = await resp.json();
    } catch (e) {
      data = { ok: false, error: "the review server did not answer (" + e + "); is `curate review` still running?" };
    }
    if (!data.ok) { show(data.error, true); return null; }
    if (reload) {
      sessionStorage.setItem("curate-flash", JSON.stringify({ text: data.message, error: false }));
      location.reload();
    }
    return data;
  }
  const card = (el) => el.closest(".card");
  const picked = (sel, root) => [...(root || document).querySelectorAll(sel + ":checked")].map((e) => e.value);

  // -- captions: the chips of a row are its caption, in order
  function rowParts(row) {
    const trig = row.dataset.trigger;
    const parts = [...row.querySelectorAll(".chip")].map((c) => c.classList.contains("trigger") ? trig : c.dataset.tag);
    return parts;
  }
  function saveParts(row, parts) { return post("caption", { path: row.dataset.path, parts }); }

  const actions = {
    undo: () => post("undo"),
    keeper: (el) => post("keeper", { sha: el.dataset.sha }),
    split: (el) => {
      const group = el.closest(".group");
      const shas = picked(".pick", group);
      if (!shas.length) return show("select the copies that do not belong first", true);
      post("split", { shas });
    },
    merge: () => {
      const groups = picked(".group-pick");
      if (groups.length !== 2) return show("tick exactly two groups to merge", true);
      post("merge", { groups });
    },
    keep: (el) => post("decide", { paths: [el.dataset.path], decision: "keep" }),
    forget: (el) => post("decide", { paths: [el.dataset.path], decision: null }),
    move: (el) => post("move", { sha: el.dataset.sha, side: el.dataset.side }),
    "filter-apply": () => post("filter-apply", { thresholds: thresholds() }),
    "tag-remove": (el) => {
      const row = card(el), chip = el.closest(".chip");
      saveParts(row, rowParts(row).filter((_, i) => i !== [...row.querySelectorAll(".chip")].indexOf(chip)));
    },
    "tag-left": (el) => shiftTag(el, -1),
    "tag-right": (el) => shiftTag(el, 1),
    edit: (el) => openEdit(card(el)),
    "save-text": (el) => post("caption", { path: card(el).dataset.path, text: card(el).querySelector("textarea").value }),
    bulk: () => {
      const only = document.getElementById("bulk-selected").checked;
      const paths = only ? picked(".pick") : null;
      if (only && !paths.length) return show("select images first (or untick 'only the selected images')", true);
      post("bulk", {
        op: document.getElementById("bulk-op").value, tag: document.getElementById("bulk-tag").value,
        new: document.getElementById("bulk-new").value, paths,
      });
    },
  };
  function shiftTag(el, d) {
    const row = card(el), chips = [...row.querySelectorAll(".chip")];
    const parts = rowParts(row), i = chips.indexOf(el.closest(".chip")), j = i + d;
    const pinned = row.dataset.trigger && chips[0] && chips[0].classList.contains("trigger") ? 1 : 0;
    if (j < pinned || j >= parts.length) return;
    [parts[i], parts[j]] = [parts[j], parts[i]];
    saveParts(row, parts);
  }
  function openEdit(row) {
    if (!row || !row.querySelector(".edit")) return;
    const box = row.querySelector(".edit");
    box.hidden = false;
    box.querySelector("textarea").focus();
  }
  document.addEventListener("click", (ev) => {
    const el = ev.target.closest("[data-action]");
    if (el && actions[el.dataset.action]) { ev.preventDefault(); actions[el.dataset.action](el); }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.classList && ev.target.classList.contains("add-tag") && ev.key === "Enter" && ev.target.value.trim()) {
      const row = card(ev.target);
      saveParts(row, [...rowParts(row), ev.target.value.trim()]);
    }
  });
  const selectPage = document.getElementById("select-page");
  if (selectPage) selectPage.addEventListener("change", () => {
    document.querySelectorAll(".pick").forEach((c) => { c.checked = selectPage.checked; });
  });

  // -- thresholds: sliders and number boxes preview the rejects before applying
  function thresholds() {
    const out = {};
    document.querySelectorAll("input.thr").forEach((i) => { out[i.dataset.threshold] = i.value; });
    return out;
  }
  let timer = null;
  function preview() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const d = await post("filter-preview", { thresholds: thresholds() }, false);
      if (!d) return;
      const why = Object.entries(d.by_reason).map(([k, v]) => k + " " + v).join(", ");
      document.getElementById("preview").textContent =
        `would reject ${d.reject} images (now ${d.current}): +${d.newly} newly rejected, -${d.freed} freed` + (why ? ` (${why})` : "");
    }, 120);
  }
  document.querySelectorAll(".thresholds input").forEach((inp) => {
    inp.addEventListener("input", () => {
      document.querySelectorAll(`.thresholds input[data-threshold="${inp.dataset.threshold}"]`).forEach((o) => {
        if (o !== inp) o.value = inp.value;
      });
      preview();
    });
  });

  // -- keyboard: j/k move, x reject, K keep (make keeper on the duplicates page), e edit, u undo
  let cur = -1;
  const cards = () => [...document.querySelectorAll(".card")];
  function go(d) {
    const all = cards();
    if (!all.length) return;
    if (all[cur]) all[cur].classList.remove("current");
    cur = Math.max(0, Math.min(all.length - 1, cur + d));
    all[cur].classList.add("current");
    all[cur].scrollIntoView({ block: "nearest" });
  }
  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const c = cards()[cur];
    if (ev.key === "j") go(1);
    else if (ev.key === "k") go(-1);
    else if (ev.key === "u") actions.undo();
    else if (ev.key === "x" && c && c.dataset.sha) post("reject-sha", { sha: c.dataset.sha });
    else if (ev.key === "x" && c && c.dataset.path) post("decide", { paths: [c.dataset.path], decision: "reject" });
    else if (ev.key === "K" && c) {
      const b = c.querySelector('[data-action="keeper"],[data-action="keep"]');
      if (b) b.click();
      else if (c.dataset.path) post("decide", { paths: [c.dataset.path], decision: "keep" });
    } else if (ev.key === "e" && c) { ev.preventDefault(); openEdit(c); }
    else return;
    ev.preventDefault();
  });
})();
