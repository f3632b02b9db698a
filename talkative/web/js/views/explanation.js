// Pieces shared by the tooltip, the detail panel and the table: an explanation with each of its tokens coloured
// by salience, a metric's value with its meaning, lens tokens as chips.
import { h } from '../dom.js';
import { lensTokens, num, shownToken } from '../format.js';
import { salienceColour } from '../metrics.js';

export function explanationNode(row, salienceMax, { tag = 'span', className = 'explanation' } = {}) {
  const pieces = row.explanation_structured;
  const sal = row.token_salience;
  if (!Array.isArray(pieces) || !pieces.length) {
    return h(tag, { class: className }, row.explanation ?? '—');
  }
  const withSalience = Array.isArray(sal) && sal.length === pieces.length;
  return h(
    tag,
    { class: className },
    pieces.map((piece, i) => {
      const value = withSalience ? sal[i] : null;
      const colour = salienceColour(value, salienceMax);
      return h(
        'span',
        {
          class: 'piece',
          style: colour ? { backgroundColor: colour } : undefined,
          title: value === null ? undefined : `salience ${value >= 0 ? '+' : ''}${num(value)}`,
        },
        shownToken(piece),
      );
    }),
  );
}

/** A metric's value with its unit; `m` is the metric's legend entry. */
export function metricValue(m, value) {
  if (value === null || value === undefined) return '—';
  return `${num(value)}${m?.unit ? ` ${m.unit}` : ''}`;
}

export function lensChips(value, limit = 10) {
  const tokens = lensTokens(value).slice(0, limit);
  if (!tokens.length) return null;
  return h('ol', { class: 'lens' }, tokens.map((t) => h('li', { class: 'lens-token' }, shownToken(t))));
}

export function outlierNote() {
  return h(
    'p',
    { class: 'outlier-note' },
    'Norm outlier (an attention-sink style activation, far larger than the rest): left out of the colour scale and the summary means.',
  );
}
