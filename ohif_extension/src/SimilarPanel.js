// The "Similar" side panel: the hits for the image in the active viewport (or for a rectangle
// the reader drew on it), with the results page's strategy and filter controls, paging,
// a click that opens a hit beside the query, and a vote per hit.
//
// A class component on purpose: the extension is loaded at run time into OHIF's own React, and
// only class components and createElement work across two copies of React (hooks do not).

import React from 'react';

import { activeImage } from './cbir.js';

const h = React.createElement;
const PAGE = 10;
const FOLLOW_MS = 400; // how often the panel looks at the active viewport's image
const STRATEGIES = [
  ['graph', 'graph (HNSW, fast)'],
  ['exact', 'exact (features)'],
  ['hamming', 'hamming (binary codes)'],
  ['class', 'class (predicted labels first)'],
  ['cluster', 'cluster (community first)'],
  ['multilateral', 'multilateral (weighted sub-codes)'],
];
const EXCLUDES = [
  ['', 'only the query image'],
  ['same-series', 'its series'],
  ['same-study', 'its study'],
  ['same-patient', 'its patient'],
];
const RELATION = { 'this patient': 'this patient', 'another patient': 'another patient' };

const styles = {
  panel: { padding: '8px', color: '#d6e0ea', fontSize: '13px', overflowY: 'auto', height: '100%' },
  row: { display: 'flex', gap: '6px', alignItems: 'center', marginBottom: '6px', flexWrap: 'wrap' },
  select: { background: '#151a26', color: '#d6e0ea', border: '1px solid #3a3f5a', padding: '2px 4px' },
  button: { background: '#151a26', color: '#5acce6', border: '1px solid #3a3f5a', padding: '2px 8px', cursor: 'pointer' },
  hit: { display: 'flex', gap: '8px', padding: '6px', borderBottom: '1px solid #2b3040', cursor: 'pointer' },
  thumb: { width: '72px', height: '72px', objectFit: 'contain', background: '#000', flex: '0 0 72px' },
  meta: { flex: '1 1 auto', minWidth: 0 },
  status: { color: '#9aa5b5', margin: '6px 0' },
};

export default class SimilarPanel extends React.Component {
  constructor(props) {
    super(props);
    this.state = {
      query: null, // {sopInstanceUid, viewportId}
      region: null, // [x0, y0, x1, y1] image pixels, when the query is a drawn rectangle
      strategy: props.defaultStrategy ?? 'graph',
      exclude: '',
      filters: { modality: '', body_part: '', sex: '', age: '' },
      offset: 0,
      hits: [],
      answer: null,
      status: 'Open an image: its similar images are listed here.',
      error: null,
      votes: {},
      comparing: null,
    };
    this.request = null;
  }

  componentDidMount() {
    this.timer = setInterval(() => this.follow(), FOLLOW_MS);
    this.unsubscribe = this.props.comparison.subscribe(hit => this.setState({ comparing: hit }));
    this.follow();
  }

  componentWillUnmount() {
    clearInterval(this.timer);
    this.unsubscribe?.();
    this.request?.abort();
  }

  /** A new image in the active viewport is a new query (not while a hit is open beside it). */
  follow() {
    if (this.props.comparison.open || this.state.region) {
      return;
    }
    const image = activeImage(this.props.services);
    if (image && image.sopInstanceUid !== this.state.query?.sopInstanceUid) {
      this.setState({ query: image, offset: 0, votes: {} }, () => this.search());
    }
  }

  async search() {
    const { query, region, strategy, exclude, offset, filters } = this.state;
    if (!query) {
      return;
    }
    this.request?.abort();
    const request = new AbortController();
    this.request = request;
    this.setState({ status: 'Searching…', error: null });
    try {
      const answer = region
        ? await this.props.client.regions(query.sopInstanceUid, region, { k: PAGE, exclude, filters }, request.signal)
        : await this.props.client.similar(query.sopInstanceUid, { strategy, exclude, k: PAGE, offset, filters },
          request.signal);
      if (this.request !== request) return;
      const hits = answer.hits ?? [];
      this.setState({
        answer,
        hits,
        status: hits.length ? null : 'No similar image in the index for this query and filter.',
      });
    } catch (error) {
      if (error.name === 'AbortError' || this.request !== request) return;
      this.setState({ hits: [], answer: null, status: null, error: String(error.message ?? error) });
    }
  }

  /** The rectangle last drawn on the query image (OHIF's RectangleROI), in image pixels. */
  drawnRegion() {
    const { measurementService, cornerstoneViewportService } = this.props.services;
    const image = activeImage(this.props.services);
    if (!image) return null;
    const drawn = measurementService
      .getMeasurements()
      .filter(m => m.toolName === 'RectangleROI' && m.SOPInstanceUID === image.sopInstanceUid && m.points?.length);
    const latest = drawn[drawn.length - 1];
    const viewport = cornerstoneViewportService.getCornerstoneViewport(image.viewportId);
    const imageData = viewport?.getImageData?.();
    if (!latest || !imageData) return null;
    const corners = latest.points.map(point => imageData.imageData.worldToIndex(point));
    const xs = corners.map(c => c[0]);
    const ys = corners.map(c => c[1]);
    return { image, box: [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)] };
  }

  drawRectangle() {
    // OHIF's own command: the tool that had the left button goes passive, the rectangle takes it
    this.props.commandsManager.runCommand('setToolActiveToolbar', { toolName: 'RectangleROI' });
    this.setState({ status: 'Draw a rectangle on the image, then press "Similar regions".', error: null });
  }

  searchRegion() {
    const drawn = this.drawnRegion();
    if (!drawn) {
      this.setState({ error: 'Draw a rectangle on the image in the active viewport first.' });
      return;
    }
    this.setState({ query: drawn.image, region: drawn.box, offset: 0, votes: {} }, () => this.search());
  }

  wholeImage() {
    this.setState({ region: null, query: null }, () => this.follow());
  }

  async vote(hit, vote) {
    const { answer, query } = this.state;
    try {
      await this.props.client.vote({
        query: answer?.query ?? query.sopInstanceUid,
        hit: hit.SOPInstanceUID,
        vote,
        rank: hit.rank,
        strategy: hit.strategy ?? answer?.strategy,
      });
      this.setState(state => ({ votes: { ...state.votes, [hit.SOPInstanceUID]: vote } }));
    } catch (error) {
      this.setState({ error: `The vote was not recorded: ${error.message}` });
    }
  }

  open(hit) {
    this.props.comparison.show(hit).catch(error => this.setState({ error: `Cannot open the hit: ${error.message}` }));
  }

  page(step) {
    this.setState(state => ({ offset: Math.max(0, state.offset + step * PAGE) }), () => this.search());
  }

  render() {
    const { strategy, exclude, hits, status, error, offset, region, votes, comparing } = this.state;
    const set = name => event => this.setState({ [name]: event.target.value, offset: 0 }, () => this.search());
    // a typed filter searches on Enter or when the field is left; a chosen one at once
    const typed = (name, label, placeholder, size) => [
      h('label', { key: `${name}-label`, htmlFor: `cbir-${name}` }, label),
      h('input', {
        key: name, id: `cbir-${name}`, style: { ...styles.select, width: size }, placeholder,
        value: this.state.filters[name],
        onChange: event => this.setState({ filters: { ...this.state.filters, [name]: event.target.value } }),
        onKeyDown: event => event.key === 'Enter' && this.setState({ offset: 0 }, () => this.search()),
        onBlur: () => this.setState({ offset: 0 }, () => this.search()),
      }),
    ];
    return h(
      'div',
      { style: styles.panel, 'data-cy': 'cbir-similar-panel', 'data-query': this.state.answer?.query ?? '',
        'data-kind': this.state.answer ? (this.state.answer.strategy === 'regions' ? 'regions' : 'images') : '' },
      h(
        'div',
        { style: styles.row },
        h('label', { htmlFor: 'cbir-strategy' }, 'Strategy'),
        h('select', { id: 'cbir-strategy', style: styles.select, value: strategy, onChange: set('strategy'), disabled: !!region },
          STRATEGIES.map(([value, label]) => h('option', { key: value, value }, label)))
      ),
      h(
        'div',
        { style: styles.row },
        h('label', { htmlFor: 'cbir-exclude' }, 'Leave out'),
        h('select', { id: 'cbir-exclude', style: styles.select, value: exclude, onChange: set('exclude') },
          EXCLUDES.map(([value, label]) => h('option', { key: value, value }, label)))
      ),
      h('div', { style: styles.row }, ...typed('modality', 'Modality', 'CT,MR', '64px'),
        ...typed('body_part', 'Body part', 'CHEST', '72px')),
      h(
        'div',
        { style: styles.row },
        h('label', { htmlFor: 'cbir-sex' }, 'Sex'),
        h('select', {
          id: 'cbir-sex', style: styles.select, value: this.state.filters.sex,
          onChange: event => this.setState({ filters: { ...this.state.filters, sex: event.target.value }, offset: 0 },
            () => this.search()),
        }, ['', 'F', 'M', 'O'].map(value => h('option', { key: value, value }, value || 'any'))),
        ...typed('age', 'Age', '40-70', '56px')
      ),
      h(
        'div',
        { style: styles.row },
        h('button', { type: 'button', style: styles.button, onClick: () => this.drawRectangle(), 'data-cy': 'cbir-draw-region' }, 'Draw region'),
        h('button', { type: 'button', style: styles.button, onClick: () => this.searchRegion(), 'data-cy': 'cbir-search-region' }, 'Similar regions'),
        region && h('button', { type: 'button', style: styles.button, onClick: () => this.wholeImage() }, 'Whole image')
      ),
      comparing &&
        h('div', { style: styles.row, 'data-cy': 'cbir-comparing' },
          `Beside the query: rank ${comparing.rank}. `,
          h('button', { type: 'button', style: styles.button, onClick: () => this.props.comparison.close() }, 'Close (Esc)')),
      region && h('div', { style: styles.status, 'data-cy': 'cbir-region' },
        `Region ${region.map(v => Math.round(v)).join(', ')} (x0, y0, x1, y1)`),
      status && h('div', { style: styles.status, 'data-cy': 'cbir-status' }, status),
      error && h('div', { style: { ...styles.status, color: '#ff8a80' }, role: 'alert' }, error),
      h('ol', { style: { listStyle: 'none', padding: 0, margin: 0 }, 'data-cy': 'cbir-hits' },
        hits.map(hit => this.renderHit(hit, votes[hit.SOPInstanceUID]))),
      !region && (hits.length || offset) ?
        h('div', { style: styles.row },
          h('button', { type: 'button', style: styles.button, disabled: offset === 0, onClick: () => this.page(-1) }, 'Previous'),
          h('span', null, `${offset + 1}–${offset + hits.length}`),
          h('button', { type: 'button', style: styles.button, disabled: hits.length < PAGE, onClick: () => this.page(1) }, 'Next'))
        : null
    );
  }

  renderHit(hit, voted) {
    const { client } = this.props;
    const described = [hit.Modality, hit.BodyPartExamined, hit.StudyDate].filter(Boolean).join(' · ');
    const voteButton = (value, label, symbol) =>
      h('button', {
        type: 'button', style: { ...styles.button, color: voted === value ? '#fff' : styles.button.color },
        'aria-pressed': voted === value ? 'true' : 'false', title: label, 'aria-label': label, 'data-vote': value,
        onClick: event => { event.stopPropagation(); this.vote(hit, value); },
      }, symbol);
    return h(
      'li',
      { key: `${hit.SOPInstanceUID}:${hit.rank}`, style: styles.hit, 'data-cy': 'cbir-hit', 'data-rank': hit.rank,
        'data-sop-instance-uid': hit.SOPInstanceUID, 'data-region': hit.region?.box.join(','),
        onClick: () => this.open(hit), title: 'Open beside the query' },
      hit.thumbnail ? h('img', { src: client.url(hit.thumbnail), alt: `hit ${hit.rank}`, style: styles.thumb }) : h('div', { style: styles.thumb }),
      h('div', { style: styles.meta },
        h('div', null, h('strong', null, `#${hit.rank}`), ` distance ${Number(hit.distance).toFixed(3)}`),
        h('div', null, described || 'no description'),
        h('div', null, RELATION[hit.patient] ?? 'patient unknown', ' · ', hit.strategy ?? ''),
        hit.region && h('div', null, `region ${hit.region.box.map(v => Math.round(v)).join(', ')}`),
        h('div', { style: styles.row }, voteButton('up', 'similar', '✓'), voteButton('down', 'not similar', '✗')))
    );
  }
}
