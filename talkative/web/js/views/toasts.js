// Short messages at the corner: information fades, errors stay until dismissed.
import { h } from '../dom.js';

export function createNotifier(container) {
  function show(text, kind) {
    const close = h('button', { type: 'button', class: 'ghost small', 'aria-label': 'Dismiss' }, '×');
    const toast = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, h('span', {}, text), close);
    close.addEventListener('click', () => toast.remove());
    container.append(toast);
    if (kind !== 'error') setTimeout(() => toast.remove(), 6000);
    while (container.children.length > 4) container.firstElementChild.remove();
  }
  return { info: (text) => show(text, 'info'), error: (text) => show(text, 'error') };
}
