// The token tooltip: explanation (words coloured by salience), metrics and logit-lens top of one token.
// It follows WCAG 1.4.13: it can be hovered itself, Escape dismisses it, and it stays while pointed at.
import { h, fill } from '../dom.js';
import { shownToken } from '../format.js';
import { explanationNode, lensChips, metricValue, outlierNote } from './explanation.js';

export function createTooltip() {
  const tip = document.getElementById('token-tip');
  let anchor = null;
  let hideTimer = null;

  tip.addEventListener('mouseenter', () => clearTimeout(hideTimer));
  tip.addEventListener('mouseleave', () => hideSoon());
  document.addEventListener('keydown', (event) => event.key === 'Escape' && hide());
  window.addEventListener('scroll', () => anchor && place(), { passive: true });
  window.addEventListener('resize', () => anchor && place());

  function place() {
    const r = anchor.getBoundingClientRect();
    const margin = 8;
    const width = Math.min(420, window.innerWidth - 2 * margin);
    tip.style.maxWidth = `${width}px`;
    const box = tip.getBoundingClientRect();
    let left = Math.min(Math.max(margin, r.left), window.innerWidth - box.width - margin);
    let top = r.bottom + 6;
    if (top + box.height > window.innerHeight - margin && r.top - box.height - 6 > margin) top = r.top - box.height - 6;
    tip.style.left = `${Math.max(margin, left)}px`;
    tip.style.top = `${top}px`;
  }

  function show(el, row, { metric, salienceMax, legend }) {
    clearTimeout(hideTimer);
    anchor = el;
    const metrics = legend.metrics.filter((m) => row[m.name] !== null && row[m.name] !== undefined);
    fill(tip, 
      h('div', { class: 'tip-head' }, h('span', { class: 'tip-token' }, shownToken(row.token)), h('span', { class: 'tip-pos' }, `position ${row.position}`)),
      explanationNode(row, salienceMax, { tag: 'p', className: 'tip-explanation' }),
      metrics.length
        ? h(
            'dl',
            { class: 'tip-metrics' },
            metrics.map((m) =>
              h('div', { class: m.name === metric ? 'current' : '' }, h('dt', {}, m.label), h('dd', {}, metricValue(m, row[m.name]))),
            ),
          )
        : null,
      row.logit_lens_top ? h('div', { class: 'tip-lens' }, h('span', { class: 'label' }, 'Logit lens'), lensChips(row.logit_lens_top, 5)) : null,
      row.outlier ? outlierNote() : null,
    );
    tip.hidden = false;
    place();
    el.setAttribute('aria-describedby', 'token-tip');
  }

  function hide() {
    clearTimeout(hideTimer);
    if (anchor) anchor.removeAttribute('aria-describedby');
    anchor = null;
    tip.hidden = true;
  }

  function hideSoon() {
    clearTimeout(hideTimer);
    hideTimer = setTimeout(hide, 150);
  }

  return { show, hide, hideSoon, get anchor() { return anchor; } };
}
