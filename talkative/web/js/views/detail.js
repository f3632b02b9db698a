// The per-token detail panel: the selected token's explanation, the salience of each explanation word as a bar,
// every metric with what it means, the lens tops, the flags, and the steer controls that re-explain it.
import { h, fill } from '../dom.js';
import { num, shownToken, spokenToken } from '../format.js';
import { salienceColour } from '../metrics.js';
import { explanationNode, lensChips, metricValue, outlierNote } from './explanation.js';
import { createSteer } from './steer.js';

function salienceBars(row, salienceMax) {
  const pieces = row.explanation_structured;
  const sal = row.token_salience;
  if (!Array.isArray(pieces) || !Array.isArray(sal) || sal.length !== pieces.length) return null;
  return h(
    'table',
    { class: 'salience-bars' },
    h('caption', {}, 'Salience: how much worse the reconstruction gets without each word'),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Word'), h('th', { scope: 'col' }, 'Salience'))),
    h(
      'tbody',
      {},
      pieces.map((piece, i) => {
        const v = sal[i];
        const width = Math.min(50, (Math.abs(v) / salienceMax) * 50);
        return h(
          'tr',
          {},
          h('th', { scope: 'row', class: 'mono' }, shownToken(piece)),
          h(
            'td',
            {},
            h(
              'span',
              { class: 'bar-track', 'aria-hidden': 'true' },
              h('span', { class: 'bar', style: { width: `${width}%`, left: v >= 0 ? '50%' : `${50 - width}%`, backgroundColor: salienceColour(v >= 0 ? salienceMax : -salienceMax, salienceMax) } }),
            ),
            h('span', { class: 'bar-value' }, `${v >= 0 ? '+' : ''}${num(v)}`),
          ),
        );
      }),
    ),
  );
}

export function createDetail({ legend, onMove, reexplain = null }) {
  const panel = h('aside', { class: 'detail', 'aria-labelledby': 'detail-title' });
  const steer = createSteer({ legend, reexplain });

  function show(rows, i, salienceMax) {
    const row = rows[i];
    steer.select(row || null);
    if (!row) {
      fill(panel, h('h3', { id: 'detail-title' }, 'Token details'), h('p', { class: 'hint' }, 'Select a token to see everything about it.'));
      return;
    }
    const metrics = legend.metrics.filter((m) => row[m.name] !== null && row[m.name] !== undefined);
    fill(panel, 
      h(
        'div',
        { class: 'detail-head' },
        h('h3', { id: 'detail-title' }, `Token ${i + 1} of ${rows.length}`, h('span', { class: 'detail-token', 'aria-label': spokenToken(row.token) }, shownToken(row.token))),
        h(
          'div',
          { class: 'detail-nav' },
          h('button', { type: 'button', class: 'ghost small', disabled: i === 0, onclick: () => onMove(i - 1), 'aria-label': 'Previous token' }, '←'),
          h('button', { type: 'button', class: 'ghost small', disabled: i === rows.length - 1, onclick: () => onMove(i + 1), 'aria-label': 'Next token' }, '→'),
        ),
      ),
      h('p', { class: 'detail-sub' }, `position ${row.position}${row.layer !== undefined && row.layer !== null ? ` · layer ${row.layer}` : ''}${row.token_id !== undefined ? ` · token id ${row.token_id}` : ''}`),
      h('h4', {}, 'Explanation'),
      explanationNode(row, salienceMax, { tag: 'p', className: 'detail-explanation' }),
      row.finish_reason ? h('p', { class: 'hint' }, `The explanation ended by: ${row.finish_reason}`) : null,
      row.outlier ? outlierNote() : null,
      salienceBars(row, salienceMax),
      metrics.length
        ? h(
            'dl',
            { class: 'detail-metrics' },
            metrics.map((m) =>
              h(
                'div',
                {},
                h('dt', {}, m.label, h('span', { class: 'direction' }, ` ${m.better} is better`)),
                h('dd', {}, metricValue(m, row[m.name])),
              ),
            ),
            row.norm !== null && row.norm !== undefined ? h('div', {}, h('dt', {}, 'Norm', h('span', { class: 'direction' }, ' of the activation')), h('dd', {}, num(row.norm))) : null,
          )
        : h('p', { class: 'hint' }, 'No metrics: the analysis ran without evaluation.'),
      row.logit_lens_top ? [h('h4', {}, 'Logit lens: the layer’s top next tokens'), lensChips(row.logit_lens_top)] : null,
      row.tuned_lens_top ? [h('h4', {}, 'Tuned lens'), lensChips(row.tuned_lens_top)] : null,
      Array.isArray(row.activation) ? h('p', { class: 'hint' }, `Activation and reconstruction vectors: ${row.activation.length} values each (in the JSONL export).`) : null,
      steer.element,
    );
  }

  return { element: panel, show };
}
