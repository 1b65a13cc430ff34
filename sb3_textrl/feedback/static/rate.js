// Keyboard-driven rating: posts judgements to the JSON API and swaps in the next item, which the server renders
// with Jinja's autoescaping (model text is never turned into HTML here). The keys an item takes are those on its
// buttons (data-key, rendered from the server's list), so the page accepts exactly the keys it shows: letters on a
// pair, digits on a single summary.
"use strict";

(() => {
  const page = document.body.dataset;
  const token = page.token;
  const rater = page.rater;
  const slot = document.getElementById("slot");
  const statusLine = document.getElementById("status");
  const POLL_MS = 3000; // how often an empty queue looks for new items (a live run may add some)
  const JUDGING_KEY = /^[1-5abts]$/; // keys that judge some kind of item: pressed on the other kind, they get a hint
  const LABELS = { A: "A is better", B: "B is better", tie: "tie", skip: "skipped" };
  let busy = false;
  let pollTimer = null;

  const currentItem = () => document.getElementById("item");

  function say(text, isError = false) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", isError);
  }

  async function errorOf(response) {
    try {
      return (await response.json()).error || response.statusText;
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  async function post(url, payload) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Token": token },
      body: JSON.stringify(payload),
      cache: "no-store",
    });
    if (!response.ok) throw new Error(await errorOf(response));
    return response.json();
  }

  async function refresh() {
    clearTimeout(pollTimer);
    const url = `${page.itemUrl}?${new URLSearchParams({ rater })}`;
    const response = await fetch(url, { headers: { "X-Token": token }, cache: "no-store" });
    if (!response.ok) throw new Error(await errorOf(response));
    slot.innerHTML = await response.text(); // server-rendered and escaped
    if (currentItem().dataset.kind === "none") pollTimer = setTimeout(() => refresh().catch(() => {}), POLL_MS);
  }

  async function act(request, message) {
    if (busy) return; // one judgement at a time: a double key press must not judge the next item unseen
    busy = true;
    try {
      const answer = await request();
      say(typeof message === "function" ? message(answer) : message);
      await refresh();
    } catch (error) {
      say(error.message, true);
    } finally {
      busy = false;
    }
  }

  function choose(choice) {
    const item = currentItem();
    if (item.dataset.kind !== "pair") return;
    const payload = { rater, kind: "pair", pair_id: Number(item.dataset.pairId), choice };
    act(() => post(page.judgeUrl, payload), `Saved: ${LABELS[choice]}.`);
  }

  function rate(score) {
    const item = currentItem();
    if (item.dataset.kind !== "single") return;
    const payload = { rater, kind: "single", candidate_id: Number(item.dataset.candidateId), score };
    act(() => post(page.judgeUrl, payload), `Saved: rated ${score}.`);
  }

  function undo() {
    act(() => post(page.undoUrl, { rater }), (answer) => (answer.undone ? "Undone." : "Nothing to undo."));
  }

  function press(button) {
    if (button.dataset.choice) choose(button.dataset.choice);
    else if (button.dataset.score) rate(Number(button.dataset.score));
    else if (button.dataset.action === "undo") undo();
  }

  if (!rater || !currentItem()) return; // no rater yet: the page only shows the name field

  document.addEventListener("keydown", (event) => {
    if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest("input, textarea, select")) return; // typing a name is not a judgement
    const key = event.key.toLowerCase();
    const buttons = [...currentItem().querySelectorAll("button[data-key]")];
    const button = buttons.find((b) => b.dataset.key === key);
    if (button) press(button);
    else if (JUDGING_KEY.test(key)) {
      // e.g. "2" on a pair: it is no answer here, and saying so beats a silent key
      const what = currentItem().dataset.kind === "pair" ? "digits score single summaries only" : "letters judge pairs only";
      say(`"${key}" does nothing here (${what}): press ${buttons.map((b) => b.dataset.key).join(", ")}.`, true);
    } else return;
    event.preventDefault();
  });

  slot.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (button) press(button);
  });

  if (currentItem().dataset.kind === "none") pollTimer = setTimeout(() => refresh().catch(() => {}), POLL_MS);
})();
