// Reading the model listing (`GET /api/v2/models`, WebSocket `model_groups_list`).

export function findModel(listing, modelId) {
  for (const group of listing?.groups || []) {
    const model = group.models.find((m) => m.id === modelId);
    if (model) return { group, model };
  }
  return null;
}

/** Where a group's weights are, in words. */
export function loadState(group, switching) {
  if (switching && switching.group_id === group.group_id) return { key: 'loading', text: 'loading…' };
  if (group.is_loaded) return { key: 'loaded', text: `loaded on ${group.location || 'a device'}` };
  if (group.location === 'cpu_cache') return { key: 'cached', text: 'parked in CPU memory (quick to bring back)' };
  return { key: 'unloaded', text: 'not loaded: the first request loads it, which takes a while' };
}
