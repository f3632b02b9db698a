// What each metric means (from the server's legend), which direction is good, and the colours the UI draws them with.
// Colour scales leave out rows flagged `outlier` (attention-sink norms): one such row would flatten the rest.

/**
 * The metrics the server reports, as `GET /api/v1/metrics/legend` describes them (the engine's one metric table):
 * `name` (the row key), `label`, `short` (a column header), `title`, `better`, `unit`, `meaning`, `role`. Every
 * view reads its metric names from here, so a metric added on the server shows up without an edit in this code.
 * Before the legend has arrived the UI knows no metric (and shows none).
 */
export class Legend {
  constructor(entries = []) {
    this.metrics = entries;
    this.byName = Object.fromEntries(entries.map((m) => [m.name, m]));
  }

  get(name) {
    return this.byName[name];
  }

  get names() {
    return this.metrics.map((m) => m.name);
  }

  /** What the summary shows and the table shows by default. */
  get headline() {
    return this.metrics.filter((m) => m.role === 'headline');
  }

  /** What one may colour by: all but the metrics derived from another (NMSE repeats the cosine). */
  get colourable() {
    return this.metrics.filter((m) => m.role !== 'derived').map((m) => m.name);
  }
}

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

export function hasValues(rows, key) {
  return rows.some((r) => finite(r[key]));
}

export function available(rows, keys) {
  return keys.filter((k) => hasValues(rows, k));
}

/** The scale of one metric over the rows that are not outliers: `badness(v)` is 0 for the best, 1 for the worst. */
export function scaleFor(rows, metric) {
  const key = metric?.name;
  const values = rows.filter((r) => !r.outlier && finite(r[key])).map((r) => r[key]);
  if (!metric || !values.length) return null;
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const higherIsBetter = metric.better === 'higher';
  return {
    key,
    lo,
    hi,
    best: higherIsBetter ? hi : lo,
    worst: higherIsBetter ? lo : hi,
    badness(v) {
      if (!finite(v)) return null;
      if (hi === lo) return 0.5;
      const t = Math.min(1, Math.max(0, (v - lo) / (hi - lo)));
      return higherIsBetter ? 1 - t : t;
    },
  };
}

// Light colours only, so dark text keeps a WCAG AA contrast on all of them; blue/orange reads for most colour
// vision deficiencies.
const GOOD = [188, 215, 245];
const MID = [244, 241, 230];
const BAD = [247, 185, 154];

function mix(a, b, t) {
  return a.map((x, i) => Math.round(x + (b[i] - x) * t));
}

export function badnessColour(t) {
  if (t === null || t === undefined) return null;
  const rgb = t < 0.5 ? mix(GOOD, MID, t * 2) : mix(MID, BAD, (t - 0.5) * 2);
  return `rgb(${rgb.join(' ')})`;
}

export function gradientCss() {
  return `linear-gradient(to right, ${badnessColour(0)}, ${badnessColour(0.5)}, ${badnessColour(1)})`;
}

/** Salience colours: how much the reconstruction suffers when a word of the explanation is removed. */
const IMPORTANT = [244, 165, 130];
const HARMFUL = [146, 197, 222];
const WHITE = [255, 255, 255];

export function salienceScale(rows) {
  const all = rows.flatMap((r) => (r.outlier ? [] : (r.token_salience || []).filter(finite).map(Math.abs)));
  all.sort((a, b) => a - b);
  const top = all.length ? all[Math.min(all.length - 1, Math.floor(all.length * 0.95))] : 0;
  return top > 0 ? top : 1;
}

export function salienceColour(value, scale) {
  if (!finite(value) || !scale) return null;
  const t = Math.min(1, Math.abs(value) / scale);
  return `rgb(${mix(WHITE, value >= 0 ? IMPORTANT : HARMFUL, t).join(' ')})`;
}
