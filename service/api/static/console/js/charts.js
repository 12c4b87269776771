// Line charts on uPlot (vendored: static/vendor/VERSIONS.md), with TensorBoard-style smoothing.
import uPlot from "../../vendor/uplot/uPlot.esm.js";
import { h } from "./ui.js";

export const PALETTE = ["#2952cc", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5c940d", "#364fc7"];

// Exponential moving average with the start-up bias removed (as TensorBoard's smoothing slider): weight 0
// is the raw series, 0.99 nearly flat. Non-finite points are passed through untouched.
export function smooth(values, weight) {
  if (!weight) return values;
  let average = 0;
  let seen = 0;
  return values.map((value) => {
    if (value === null || value === undefined || !Number.isFinite(value)) return value;
    average = average * weight + (1 - weight) * value;
    seen += 1;
    return average / (1 - Math.pow(weight, seen));
  });
}

// Several {x: [...], y: [...]} series on one x axis: the union of their x values, null where one has none.
export function align(series) {
  const xs = [...new Set(series.flatMap((s) => s.x))].sort((a, b) => a - b);
  const position = new Map(xs.map((x, i) => [x, i]));
  const ys = series.map((s) => {
    const column = new Array(xs.length).fill(null);
    s.x.forEach((x, i) => {
      column[position.get(x)] = s.y[i];
    });
    return column;
  });
  return [xs, ...ys];
}

// Steps are whole numbers: ticks at 1, 2, 5 x 10^k only.
const STEP_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];

function fade(color) {
  return color + "55";
}

// One uPlot chart in a <figure>: `lines` are the series' labels; setData takes aligned [x, ...ys] (raw).
// With smoothing on, each line is drawn smoothed over its faint raw self.
export class LineChart {
  constructor(container, { title, lines, xLabel = "step", height = 220 }) {
    this.title = title;
    this.lines = lines;
    this.xLabel = xLabel;
    this.height = height;
    this.weight = 0;
    this.data = [[], ...lines.map(() => [])];
    this.count = h("span", { class: "muted small", text: "0 points" });
    this.plotBox = h("div", { class: "plot", role: "img", "aria-label": "Chart of " + title });
    this.figure = h(
      "figure",
      { class: "chart", "data-chart": title, "data-points": "0" },
      h("figcaption", null, h("span", { text: title }), this.count),
      this.plotBox,
    );
    container.append(this.figure);
    this.build();
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.plotBox);
  }

  build() {
    this.plot?.destroy();
    const smoothed = this.weight > 0;
    const series = [{ label: this.xLabel }];
    this.lines.forEach((label, i) => {
      const color = PALETTE[i % PALETTE.length];
      if (smoothed) series.push({ label: label + " (raw)", stroke: fade(color), width: 1, spanGaps: true });
      series.push({ label, stroke: color, width: 2, spanGaps: true, points: { show: false } });
    });
    this.plot = new uPlot(
      {
        width: this.width(),
        height: this.height,
        series,
        scales: { x: { time: false } },
        axes: [{ label: this.xLabel, size: 40, incrs: STEP_TICKS }, { size: 56 }],
        legend: { live: true },
        cursor: { drag: { x: true, y: false } },
      },
      this.plotData(),
      this.plotBox,
    );
  }

  width() {
    return Math.max(240, this.plotBox.clientWidth || 480);
  }

  resize() {
    const width = this.width();
    if (this.plot && Math.abs(this.plot.width - width) > 2) this.plot.setSize({ width, height: this.height });
  }

  plotData() {
    const [x, ...ys] = this.data;
    if (this.weight <= 0) return [x, ...ys];
    return [x, ...ys.flatMap((y) => [y, smooth(y, this.weight)])];
  }

  setSmoothing(weight) {
    const rebuild = (weight > 0) !== (this.weight > 0);
    this.weight = weight;
    if (rebuild) this.build();
    else this.plot.setData(this.plotData());
  }

  setData(data) {
    this.data = data;
    const points = data.slice(1).reduce((n, y) => n + y.filter((v) => v !== null).length, 0);
    // The newest value in words too: what a screen reader (or a glance) wants from a live chart.
    const last = data.length === 2 ? data[1].findLast((v) => v !== null && v !== undefined) : undefined;
    this.count.textContent =
      points + (points === 1 ? " point" : " points") + (last !== undefined ? ", last " + Number(last.toPrecision(4)) : "");
    this.figure.dataset.points = String(points);
    this.plot.setData(this.plotData());
  }

  destroy() {
    this.resizer.disconnect();
    this.plot?.destroy();
    this.figure.remove();
  }
}

// The smoothing slider shared by a page's charts.
export function smoothingControl(onChange, initial = 0) {
  const id = "smooth-" + Math.random().toString(36).slice(2, 8);
  const output = h("output", { for: id, text: initial.toFixed(2) });
  const input = h("input", {
    id,
    type: "range",
    min: "0",
    max: "0.99",
    step: "0.01",
    value: String(initial),
    oninput: () => {
      output.textContent = Number(input.value).toFixed(2);
      onChange(Number(input.value));
    },
  });
  return h("div", { class: "field inline" }, h("label", { for: id, text: "Smoothing" }), input, output);
}
