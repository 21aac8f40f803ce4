// The console's only script: every few seconds it fetches this page again and swaps in its
// live parts (elements with data-live, matched by id), so the page stays current without a
// reload. Paused while the tab is hidden; a signed-out session lands on the sign-in page.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const main = document.querySelector("[data-refresh-seconds]");
  if (!main || !document.querySelector("[data-live]")) return;
  const every = 1000 * Number(main.dataset.refreshSeconds);
  const status = document.getElementById("refresh-status");

  async function refresh() {
    if (document.hidden) return;
    const response = await fetch(location.href, { cache: "no-store", credentials: "same-origin" });
    if (response.redirected) {
      location.assign(response.url);
      return;
    }
    if (!response.ok && response.status !== 404) throw new Error(`status ${response.status}`);
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const old of document.querySelectorAll("[data-live]")) {
      const update = fresh.getElementById(old.id);
      if (update) old.replaceWith(document.importNode(update, true));
    }
    status.textContent = "";
  }

  async function loop() {
    try {
      await refresh();
    } catch (error) {
      status.textContent = `Could not refresh (${error.message}); trying again.`;
    }
    setTimeout(loop, every);
  }
  setTimeout(loop, every);
});
