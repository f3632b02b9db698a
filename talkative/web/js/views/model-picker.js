// A model picker: the server's model groups as option groups, each model with its layer; the chosen model's
// description, its group's and its load state below. Pickers share one choice (`modelId`), remembered.
import { h, clear, fill } from '../dom.js';
import { findModel, loadState } from '../models.js';
import { save } from '../prefs.js';

export function createModelPicker({ select, info, store }) {
  function render() {
    const listing = store.get('models');
    const chosen = store.get('modelId');
    clear(select);
    if (!listing || !listing.groups?.length) {
      select.append(h('option', { value: '' }, listing ? 'No models on this server' : 'Loading models…'));
      select.disabled = true;
      info.textContent = '';
      return;
    }
    select.disabled = false;
    for (const group of listing.groups) {
      const models = group.models.filter((m) => !m.backend_only);
      if (!models.length) continue;
      select.append(
        h(
          'optgroup',
          { label: group.group_name || group.group_id },
          models.map((m) =>
            h('option', { value: m.id, selected: m.id === chosen }, `${m.name || m.id} · layer ${m.layer ?? '?'}`),
          ),
        ),
      );
    }
    renderInfo();
  }

  function renderInfo() {
    const found = findModel(store.get('models'), select.value);
    if (!found) {
      info.textContent = '';
      return;
    }
    const { group, model } = found;
    const state = loadState(group, store.get('switching'));
    fill(info, 
      h('span', { class: `badge ${state.key}` }, state.text),
      ' ',
      model.description || '',
      group.description ? h('span', { class: 'group-desc' }, ` ${group.group_name}: ${group.description}`) : '',
    );
  }

  select.addEventListener('change', () => {
    store.set('modelId', select.value);
    save('modelId', select.value);
  });
  store.on('models', render);
  store.on('switching', renderInfo);
  store.on('modelId', (id) => {
    if (select.value !== id) {
      select.value = id;
      renderInfo();
    }
  });
  render();
}

/** The model to preselect: the remembered one when the server still lists it, else the server's current one. */
export function preferredModel(listing, remembered) {
  const usable = (id) => {
    const found = findModel(listing, id);
    return found && !found.model.backend_only;
  };
  if (remembered && usable(remembered)) return remembered;
  if (listing.current_model && usable(listing.current_model)) return listing.current_model;
  for (const g of listing.groups || []) for (const m of g.models) if (!m.backend_only) return m.id;
  return null;
}
