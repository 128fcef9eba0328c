// The stats page: reads the form (or ?customer=&from=&to=), asks
// GET customers/{id}/stats, draws uPlot charts and fills the summary. No build step.
"use strict";

(function () {
  const DAY = 86400; // seconds; uPlot's x values are Unix seconds
  const MAX_FILLED_DAYS = 1000; // longer ranges chart only the days with requests
  const COLORS = {
    ok: "#2f9e44",
    client: "#f08c00",
    server: "#e03131",
    uptime: "#1c7ed6",
    avg: "#1c7ed6",
    median: "#7048e8",
    p99: "#e8590c",
  };

  const $ = (id) => document.getElementById(id);
  const form = $("query");
  const inputs = { customer: $("customer"), from: $("from"), to: $("to") };
  const charts = [];
  let inFlight = null;

  const countFormat = new Intl.NumberFormat("en-US");
  const msFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
  const pctFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 3 });

  function isoDay(seconds) {
    return new Date(seconds * 1000).toISOString().slice(0, 10);
  }

  function daySeconds(iso) {
    return Date.parse(iso + "T00:00:00Z") / 1000;
  }

  function today() {
    return isoDay(Math.floor(Date.now() / 1000));
  }

  function lastDays(n) {
    const to = today();
    return { from: isoDay(daySeconds(to) - (n - 1) * DAY), to };
  }

  function fromUrl() {
    const params = new URLSearchParams(window.location.search);
    const range = lastDays(30);
    inputs.customer.value = params.get("customer") || "";
    inputs.from.value = params.get("from") || range.from;
    inputs.to.value = params.has("to") ? params.get("to") : range.to;
  }

  function toUrl() {
    const params = new URLSearchParams();
    params.set("customer", inputs.customer.value.trim());
    params.set("from", inputs.from.value);
    if (inputs.to.value) params.set("to", inputs.to.value);
    const url = "?" + params.toString();
    if (url !== window.location.search) window.history.pushState(null, "", url);
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function setStatus(message) {
    $("status").textContent = message;
  }

  async function load() {
    const customer = inputs.customer.value.trim();
    showError("");
    if (!customer) {
      $("result").hidden = true;
      setStatus("Enter a customer id.");
      return;
    }
    let url = "customers/" + encodeURIComponent(customer) + "/stats?from=" +
      encodeURIComponent(inputs.from.value);
    if (inputs.to.value) url += "&to=" + encodeURIComponent(inputs.to.value);

    if (inFlight) inFlight.abort();
    const request = new AbortController();
    inFlight = request;
    setStatus("Loading " + customer + "…");
    document.body.classList.add("loading");
    const started = performance.now();
    try {
      const response = await fetch(url, {
        signal: request.signal,
        headers: { Accept: "application/json" },
      });
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      if (!response.ok) {
        const reason = body && body.error ? body.error : response.statusText;
        $("result").hidden = true;
        setStatus("");
        showError(response.status + ": " + reason);
        return;
      }
      render(body);
      setStatus("Loaded in " + Math.round(performance.now() - started) + " ms.");
    } catch (err) {
      if (err.name === "AbortError") return;
      $("result").hidden = true;
      setStatus("");
      showError("Request failed: " + err.message);
    } finally {
      if (inFlight === request) {
        inFlight = null;
        document.body.classList.remove("loading");
      }
    }
  }

  // One x value per calendar day of the range (gaps are days without requests), so the
  // bars and lines keep their real spacing; null marks a missing figure.
  function columns(stats) {
    const byDate = new Map(stats.days.map((d) => [d.date, d]));
    const first = daySeconds(stats.from);
    const lastIso = stats.to || (stats.days.length ? stats.days[stats.days.length - 1].date : stats.from);
    const last = Math.max(first, daySeconds(lastIso));
    let xs;
    if ((last - first) / DAY + 1 <= MAX_FILLED_DAYS) {
      xs = [];
      for (let x = first; x <= last; x += DAY) xs.push(x);
    } else {
      xs = stats.days.map((d) => daySeconds(d.date));
    }
    const pick = (field, missing) =>
      xs.map((x) => {
        const day = byDate.get(isoDay(x));
        return day ? day[field] : missing;
      });
    const total = pick("total_requests", 0);
    const failed = pick("failed_requests", 0);
    const server = pick("server_errors", 0);
    return {
      xs,
      total,
      failed,
      server,
      successful: pick("successful_requests", 0),
      client: pick("client_errors", 0),
      uptime: pick("uptime_pct", null),
      avg: pick("avg_latency_ms", null),
      median: pick("median_latency_ms", null),
      p99: pick("p99_latency_ms", null),
    };
  }

  function baseOptions(el, height) {
    return {
      width: el.clientWidth || 600,
      height,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      // One cursor for the three charts: pointing at a day shows its figures in every legend.
      cursor: { y: false, points: { size: 6 }, sync: { key: "days" } },
      legend: { live: true },
      scales: { x: { time: true, range: (u, min, max) => [min - DAY / 2, max + DAY / 2] } },
    };
  }

  // Whole-number steps for counts: 1, 2, 5, 10, 20, 50, ...
  const COUNT_STEPS = [];
  for (let m = 1; m <= 1e9; m *= 10) COUNT_STEPS.push(m, 2 * m, 5 * m);

  function axes(unit, format, incrs) {
    const y = { label: unit, size: 60, grid: { stroke: "#eee" }, values: (u, ticks) => ticks.map(format) };
    if (incrs) y.incrs = incrs;
    return [{ space: 60, grid: { stroke: "#eee" } }, y];
  }

  function daySeries() {
    return { label: "Day", value: (u, v) => (v == null ? "–" : isoDay(v)) };
  }

  function requestsChart(el, c) {
    const bars = uPlot.paths.bars({ size: [0.7, 48], align: 0 });
    // Stacked by overdrawing: total (green) under failed (amber) under 5xx (red); the
    // legend shows each part's own count.
    const own = (part) => (u, v, si, i) => (i == null ? "–" : countFormat.format(part[i]));
    const opts = Object.assign(baseOptions(el, 220), {
      series: [
        daySeries(),
        { label: "Successful", fill: COLORS.ok, stroke: COLORS.ok, width: 0, paths: bars,
          points: { show: false }, value: own(c.successful) },
        { label: "Failed (4xx)", fill: COLORS.client, stroke: COLORS.client, width: 0, paths: bars,
          points: { show: false }, value: own(c.client) },
        { label: "Failed (5xx)", fill: COLORS.server, stroke: COLORS.server, width: 0, paths: bars,
          points: { show: false }, value: own(c.server) },
      ],
      axes: axes("requests", (v) => countFormat.format(v), COUNT_STEPS),
    });
    opts.scales.y = { range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1] };
    return new uPlot(opts, [c.xs, c.total, c.failed, c.server], el);
  }

  function line(label, color, format) {
    return {
      label,
      stroke: color,
      width: 2,
      spanGaps: false,
      points: { size: 5, fill: color },
      value: (u, v) => (v == null ? "–" : format(v)),
    };
  }

  function uptimeChart(el, c) {
    const opts = Object.assign(baseOptions(el, 160), {
      series: [
        daySeries(),
        line("Uptime", COLORS.uptime, (v) => pctFormat.format(v) + " %"),
      ],
      axes: axes("%", (v) => pctFormat.format(v)),
    });
    opts.scales.y = {
      range: (u, min, max) => {
        if (min == null) return [0, 100];
        return [Math.max(0, Math.floor(min / 5) * 5 - 5), 101];
      },
    };
    return new uPlot(opts, [c.xs, c.uptime], el);
  }

  function latencyChart(el, c) {
    const ms = (v) => msFormat.format(v) + " ms";
    const opts = Object.assign(baseOptions(el, 220), {
      series: [
        daySeries(),
        line("Average", COLORS.avg, ms),
        line("Median", COLORS.median, ms),
        line("p99", COLORS.p99, ms),
      ],
      axes: axes("ms", (v) => msFormat.format(v)),
    });
    opts.scales.y = { range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1] };
    return new uPlot(opts, [c.xs, c.avg, c.median, c.p99], el);
  }

  function formatField(field, value) {
    if (value == null) return "–";
    if (field === "uptime_pct") return pctFormat.format(value) + " %";
    if (field.endsWith("_ms")) return msFormat.format(value) + " ms";
    return countFormat.format(value);
  }

  function renderSummary(stats, c) {
    const summary = stats.summary;
    for (const el of document.querySelectorAll("#summary [data-field]")) {
      el.textContent = formatField(el.dataset.field, summary[el.dataset.field]);
    }
    for (const el of document.querySelectorAll("#summary [data-error]")) {
      const bound = summary.quantile_error[el.dataset.error];
      el.textContent = bound ? "±" + pctFormat.format(bound * 100) + " %" : "";
    }
    const daysWithRequests = stats.days.length;
    $("days-with-requests").textContent = daysWithRequests + " of " + c.xs.length;
  }

  function renderTable(stats) {
    const fields = ["total_requests", "successful_requests", "failed_requests", "client_errors",
      "server_errors", "uptime_pct", "avg_latency_ms", "median_latency_ms", "p99_latency_ms"];
    const body = document.querySelector("#daily tbody");
    body.replaceChildren(...stats.days.map((day) => {
      const row = document.createElement("tr");
      const cells = [day.date, ...fields.map((f) =>
        f.endsWith("_ms") ? msFormat.format(day[f]) : f === "uptime_pct"
          ? pctFormat.format(day[f]) : countFormat.format(day[f]))];
      for (const text of cells) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    }));
  }

  function render(stats) {
    const c = columns(stats);
    $("title").textContent = stats.customer_id + " · " + stats.from + " to " +
      (stats.to || "newest day");
    $("result").hidden = false;
    while (charts.length) charts.pop().destroy();
    charts.push(
      requestsChart($("chart-requests"), c),
      uptimeChart($("chart-uptime"), c),
      latencyChart($("chart-latency"), c),
    );
    renderSummary(stats, c);
    renderTable(stats);
    if (!stats.days.length) setStatus("No requests in this range.");
  }

  const resize = new ResizeObserver(() => {
    for (const chart of charts) {
      const width = chart.root.parentElement.clientWidth;
      if (width && width !== chart.width) chart.setSize({ width, height: chart.height });
    }
  });
  resize.observe($("charts"));

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    toUrl();
    load();
  });
  for (const button of document.querySelectorAll(".presets button")) {
    button.addEventListener("click", () => {
      const range = lastDays(Number(button.dataset.days));
      inputs.from.value = range.from;
      inputs.to.value = range.to;
      if (inputs.customer.value.trim()) form.requestSubmit();
    });
  }
  window.addEventListener("popstate", () => {
    fromUrl();
    load();
  });

  fromUrl();
  if (inputs.customer.value) load();
  else inputs.customer.focus();
})();
