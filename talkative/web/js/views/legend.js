// The legend: the colour scale of the chosen metric (with this text's best and worst values), the salience
// colours, what an outlier is, and what every metric means and which direction is good.
import { h, fill } from '../dom.js';
import { num } from '../format.js';
import { gradientCss, salienceColour } from '../metrics.js';

/** `legend`: the server's metric legend (metrics.js `Legend`). */
export function createLegend(legend) {
  const section = h('section', { class: 'legend', 'aria-labelledby': 'legend-title' });

  function render({ metric, scale, salienceMax, present }) {
    const m = legend.get(metric);
    fill(section, 
      h('h3', { id: 'legend-title' }, 'How to read the colours'),
      m && scale
        ? h(
            'div',
            { class: 'scale' },
            h('p', {}, h('strong', {}, m.label), `: ${m.better} is better.`),
            h('div', { class: 'gradient', style: { background: gradientCss() }, 'aria-hidden': 'true' }),
            h('div', { class: 'scale-ends' }, h('span', {}, `best ${num(scale.best)}`), h('span', {}, `worst ${num(scale.worst)}`)),
            h('p', { class: 'hint' }, 'Scaled over this text’s tokens, outliers left out.'),
          )
        : h('p', { class: 'hint' }, 'This result has no metric to colour by (it ran without evaluation).'),
      h(
        'ul',
        { class: 'swatches' },
        h('li', {}, h('span', { class: 'swatch outlier', 'aria-hidden': 'true' }), 'Striped grey: a norm outlier (attention-sink activation), not coloured.'),
        h('li', {}, h('span', { class: 'swatch', style: { background: salienceColour(salienceMax, salienceMax) }, 'aria-hidden': 'true' }), 'Explanation word in orange: important. Without it the reconstruction gets worse (positive salience).'),
        h('li', {}, h('span', { class: 'swatch', style: { background: salienceColour(-salienceMax, salienceMax) }, 'aria-hidden': 'true' }), 'In blue: the reconstruction gets better without it (negative salience).'),
      ),
      h(
        'details',
        { class: 'definitions' },
        h('summary', {}, 'What the metrics mean'),
        h(
          'dl',
          {},
          legend.metrics.filter((x) => present.includes(x.name)).map((x) => [
            h('dt', {}, `${x.label} (${x.title}${x.unit ? `, ${x.unit}` : ''}): ${x.better} is better`),
            h('dd', {}, x.meaning),
          ]),
        ),
      ),
    );
  }

  return { element: section, render };
}
