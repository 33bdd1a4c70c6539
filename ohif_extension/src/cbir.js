// The orthanc-cbir routes the panel calls, and what it reads from OHIF's viewports.
// No OHIF import: the services come from the extension's registration, so one file serves
// OHIF's own app and a hospital's build of it.

/** Where the /cbir routes are: `window.config.orthancCbir.root` (another origin must send CORS
 * headers for it), else `/cbir` on OHIF's own origin (`orthanc-cbir viewer`). */
export function cbirRoot(appConfig) {
  const root = appConfig?.orthancCbir?.root ?? '/cbir';
  return root.replace(/\/+$/, '');
}

/** The SOPInstanceUID of a Cornerstone image id: WADO-RS (`.../instances/{uid}/frames/{n}`)
 * or WADO-URI (`...&objectUID={uid}`); null for anything else. */
export function sopInstanceUidOf(imageId) {
  if (typeof imageId !== 'string') {
    return null;
  }
  const wadors = imageId.match(/\/instances\/([0-9.]+)\/frames\//);
  if (wadors) {
    return wadors[1];
  }
  const wadouri = imageId.match(/[?&]objectUID=([0-9.]+)/);
  return wadouri ? wadouri[1] : null;
}

/** The image shown in the active viewport: `{viewportId, imageId, sopInstanceUid}`, or null. */
export function activeImage(services) {
  const { viewportGridService, cornerstoneViewportService } = services;
  const viewportId = viewportGridService.getActiveViewportId();
  const viewport = viewportId && cornerstoneViewportService.getCornerstoneViewport(viewportId);
  const imageId = viewport?.getCurrentImageId?.();
  const sopInstanceUid = sopInstanceUidOf(imageId);
  return sopInstanceUid ? { viewportId, imageId, sopInstanceUid } : null;
}

export class CbirClient {
  constructor(root, services) {
    this.root = root;
    this.services = services;
  }

  headers(extra = {}) {
    // A hospital's OHIF that signs its requests (OIDC) signs these the same way.
    const signed = this.services.userAuthenticationService?.getAuthorizationHeader?.() ?? {};
    return { Accept: 'application/json', ...signed, ...extra };
  }

  /** The resolved URL of a path the answers name (`/cbir/instances/{id}/thumbnail`). */
  url(path) {
    return path.startsWith('/cbir/') ? this.root + path.slice('/cbir'.length) : path;
  }

  async similar(sopInstanceUid, { strategy, exclude, k, offset, filters = {} }, signal) {
    const query = new URLSearchParams({ k: String(k), offset: String(offset) });
    if (strategy) query.set('strategy', strategy);
    if (exclude) query.set('exclude', exclude);
    setFilters(query, filters);
    const response = await fetch(`${this.root}/instances/${encodeURIComponent(sopInstanceUid)}/similar?${query}`, {
      headers: this.headers(),
      credentials: 'same-origin',
      signal,
    });
    return answer(response);
  }

  async regions(sopInstanceUid, box, { k, exclude, filters = {} }, signal) {
    const query = new URLSearchParams({ k: String(k), box: box.map(v => Math.round(v)).join(',') });
    if (exclude) query.set('exclude', exclude);
    setFilters(query, filters);
    const response = await fetch(
      `${this.root}/instances/${encodeURIComponent(sopInstanceUid)}/similar-regions?${query}`,
      { headers: this.headers(), credentials: 'same-origin', signal }
    );
    return answer(response);
  }

  async vote(fields) {
    const response = await fetch(`${this.root}/votes`, {
      method: 'POST',
      headers: this.headers({ 'Content-Type': 'application/json' }),
      credentials: 'same-origin',
      body: JSON.stringify(fields),
    });
    return answer(response);
  }
}

/** The results page's filters (modality, body_part, sex, age), those that are set. */
function setFilters(query, filters) {
  for (const [name, value] of Object.entries(filters)) {
    if (value && String(value).trim()) query.set(name, String(value).trim());
  }
}

async function answer(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const reason = body?.error ?? body?.message ?? (text.slice(0, 200) || response.statusText);
    throw new Error(`${response.status}: ${reason}`);
  }
  return body;
}
