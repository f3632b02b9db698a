// What each metric means, which direction is good, and the colours the UI draws them with.
// Colour scales leave out rows flagged `outlier` (attention-sink norms): one such row would flatten the rest.

export const METRICS = [
  {
    key: 'fve',
    label: 'FVE',
    name: 'Fraction of variance explained',
    better: 'higher',
    text: '1 − NMSE ÷ the variance of the activations: 1 is a perfect reconstruction, 0 is no better than the average activation. Needs the checkpoint’s activation variance.',
  },
  {
    key: 'relative_rmse',
    label: 'Relative RMSE',
    name: 'Relative reconstruction error',
    better: 'lower',
    text: '‖A − Â‖ ÷ ‖A‖: the error of the vector rebuilt from the explanation, relative to the activation’s size. 0 is perfect; 1 is an error as large as the activation.',
  },
  {
    key: 'cosine',
    label: 'Cosine',
    name: 'Cosine similarity',
    better: 'higher',
    text: 'How well the rebuilt vector points the same way as the activation: 1 is the same direction, 0 unrelated.',
  },
  {
    key: 'kl_divergence',
    label: 'KL',
    unit: 'nats',
    name: 'KL divergence of the prediction',
    better: 'lower',
    text: 'How much the model’s next-token prediction changes when the rebuilt vector replaces the activation. 0 is unchanged.',
  },
  {
    key: 'mse',
    label: 'MSE',
    name: 'Mean squared error',
    better: 'lower',
    text: 'Mean squared difference between the activation and its reconstruction; it grows with the activation’s scale, so compare it within one text.',
  },
  {
    key: 'nmse',
    label: 'NMSE',
    name: 'Normalised MSE',
    better: 'lower',
    text: 'The MSE after both vectors are scaled to the same length: 2 × (1 − cosine). 0 is perfect.',
  },
];

export const METRIC = Object.fromEntries(METRICS.map((m) => [m.key, m]));
export const COLOUR_METRICS = ['fve', 'relative_rmse', 'cosine', 'kl_divergence', 'mse'];

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

export function hasValues(rows, key) {
  return rows.some((r) => finite(r[key]));
}

export function available(rows, keys = COLOUR_METRICS) {
  return keys.filter((k) => hasValues(rows, k));
}

/** The scale of one metric over the rows that are not outliers: `badness(v)` is 0 for the best, 1 for the worst. */
export function scaleFor(rows, key) {
  const metric = METRIC[key];
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
