// The report's own script: draws every chart from its inlined Vega-Lite spec and drives the
// configuration filters. Runs after the inlined Vega bundle; fetches nothing.
(() => {
  const views = {};
  const configs = JSON.parse(document.getElementById("advlab-configs").textContent);
  const hidden = new Set(); // configurations switched off in the page legend

  const specs = Array.from(document.querySelectorAll("script.vl-spec"));
  const drawn = specs.map((script) =>
    vegaEmbed("#" + script.dataset.target, JSON.parse(script.textContent), {
      actions: false,
      renderer: "svg",
    }).then((result) => {
      views[script.dataset.target] = result.view;
    })
  );

  // The configurations every filter lets through and the legend has not switched off.
  function visible() {
    const chosen = {};
    document.querySelectorAll("select[data-filter]").forEach((select) => {
      if (select.value !== "") chosen[select.dataset.filter] = select.value;
    });
    return configs
      .filter((c) => !hidden.has(c.key))
      .filter((c) => Object.entries(chosen).every(([k, v]) => c.values[k] === v))
      .map((c) => c.key);
  }

  function apply() {
    const keys = visible();
    const shown = new Set(keys);
    document.querySelectorAll("[data-config]").forEach((element) => {
      if (element.classList.contains("chip")) {
        element.classList.toggle("off", hidden.has(element.dataset.config));
      } else {
        element.hidden = !shown.has(element.dataset.config);
      }
    });
    document.getElementById("advlab-shown").textContent =
      keys.length + " of " + configs.length + " configurations shown";
    return Promise.all(Object.values(views).map((v) => v.signal("visible", keys).runAsync()));
  }

  document.querySelectorAll("select[data-filter]").forEach((select) => {
    select.addEventListener("change", apply);
  });
  document.querySelectorAll(".chip[data-config]").forEach((chip) => {
    chip.addEventListener("click", () => {
      const key = chip.dataset.config;
      if (hidden.has(key)) hidden.delete(key);
      else hidden.add(key);
      apply();
    });
  });

  apply(); // tables and the count now; the charts get the same keys as they are drawn

  window.advlab = {
    views,
    apply,
    ready: Promise.all(drawn)
      .then(() => {
        document.body.dataset.charts = String(specs.length);
      })
      .catch((error) => {
        document.body.dataset.charts = "failed";
        console.error("advlab: a chart could not be drawn:", error);
      }),
  };
})();
