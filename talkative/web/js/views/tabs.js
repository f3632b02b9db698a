// The section tabs (WAI-ARIA tabs pattern: arrow keys move between tabs, the panel follows).
import { $$ } from '../dom.js';

export function createTabs(tablist, { onChange = () => {} } = {}) {
  const tabs = $$('[role="tab"]', tablist);

  function select(name, { focus = false } = {}) {
    for (const tab of tabs) {
      const on = tab.id === `tab-${name}`;
      tab.setAttribute('aria-selected', String(on));
      tab.tabIndex = on ? 0 : -1;
      document.getElementById(tab.getAttribute('aria-controls')).hidden = !on;
      if (on && focus) tab.focus();
    }
    onChange(name);
  }

  tablist.addEventListener('click', (event) => {
    const tab = event.target.closest('[role="tab"]');
    if (tab) select(tab.id.slice(4));
  });
  tablist.addEventListener('keydown', (event) => {
    const i = tabs.indexOf(document.activeElement);
    if (i < 0) return;
    const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = tabs[(moves[event.key] + tabs.length) % tabs.length];
    select(next.id.slice(4), { focus: true });
  });
  return { select, current: () => tabs.find((t) => t.getAttribute('aria-selected') === 'true').id.slice(4) };
}
