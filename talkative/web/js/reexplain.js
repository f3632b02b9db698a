// Re-explaining one token of a result with a steer: the token's activation (from the row when the analysis
// returned vectors, else extracted once per token from the result's input) is explained by `describe` with the
// result's own best-of-k, temperature and seed, and `options.steer`.

export function createReexplain(api) {
  const activations = new Map(); // `${run id}:${position}` -> the activation at that position

  async function activation(run, row, modelId) {
    const steered = Boolean((run.result.metadata || {}).steer);
    if (Array.isArray(row.activation) && !steered) return row.activation; // a steered row's vector is steered already
    const key = `${run.requestId || run.id}:${row.position}`;
    if (activations.has(key)) return activations.get(key);
    if (!run.input) {
      throw new Error('This result has no input to take the activation from: analyse it again to steer it.');
    }
    const body = await api.extract({ ...run.input, model_id: modelId, positions: [row.position] });
    const vector = body.activations[0];
    activations.set(key, vector);
    return vector;
  }

  /** The steered explanation of `row` (a describe result row: explanation, metrics, norm). */
  return async function reexplain(run, row, direction, alpha) {
    const meta = run.result.metadata || {};
    const modelId = meta.model_id || run.modelId || undefined;
    const vector = await activation(run, row, modelId);
    const options = {
      seed: meta.seed ?? 42,
      optimize_explanations_config: { best_of_k: meta.best_of_k || 1 },
      steer: { direction, alpha },
    };
    if (typeof meta.temperature === 'number') options.temperature = meta.temperature;
    const body = await api.describe({ vectors: [vector], tokens: [row.token_id], model_id: modelId, options });
    return body.results[0];
  };
}
