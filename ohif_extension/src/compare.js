// The side-by-side view: the query's viewport on the left, a hit on the right (its study
// loaded into OHIF, its own image shown, the matching region drawn when there is one);
// Escape, or closing it from the panel, returns to the layout the reader had.

import { activeImage } from './cbir.js';

const REGION_COLOUR = '#ffd400';

async function until(condition, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = condition();
    if (value) {
      return value;
    }
    await new Promise(resolve => setTimeout(resolve, 50));
  }
  throw new Error('the viewer did not get there in time');
}

function orderedViewportIds(state) {
  return [...state.viewports.values()]
    .sort((a, b) => (a.positionId ?? '').localeCompare(b.positionId ?? ''))
    .map(viewport => viewport.viewportId);
}

export class Comparison {
  constructor(services, commandsManager) {
    this.services = services;
    this.commandsManager = commandsManager;
    this.previous = null; // the grid before the comparison opened
    this.overlay = null;
    this.listeners = new Set();
    this.onKey = event => {
      if (event.key === 'Escape' && this.previous) {
        this.close();
      }
    };
  }

  get open() {
    return this.previous !== null;
  }

  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  changed(hit) {
    this.listeners.forEach(listener => listener(hit));
  }

  /** Loads `hit`'s study, shows its image beside the active viewport's, and draws `hit.region`. */
  async show(hit) {
    const { viewportGridService, displaySetService } = this.services;
    const before = viewportGridService.getState();
    if (!this.previous) {
      this.previous = {
        numRows: before.layout.numRows,
        numCols: before.layout.numCols,
        queryImage: activeImage(this.services)?.sopInstanceUid,
      };
      document.addEventListener('keydown', this.onKey);
    }
    await this.commandsManager.runCommand('loadStudy', { StudyInstanceUID: hit.StudyInstanceUID });
    const displaySet = await until(() =>
      displaySetService
        .getActiveDisplaySets()
        .find(set => set.SeriesInstanceUID === hit.SeriesInstanceUID && set.images?.length)
    );
    const state = viewportGridService.getState();
    if (state.layout.numRows !== 1 || state.layout.numCols !== 2) {
      this.commandsManager.runCommand('setViewportGridLayout', { numRows: 1, numCols: 2 });
      await until(() => {
        const grid = viewportGridService.getState();
        return grid.layout.numRows === 1 && grid.layout.numCols === 2 && grid.viewports.size === 2;
      });
    }
    const [left, right] = orderedViewportIds(viewportGridService.getState());
    // the left viewport keeps the query as it is; only the right one is given the hit's series
    viewportGridService.setDisplaySetsForViewports([
      { viewportId: right, displaySetInstanceUIDs: [displaySet.displaySetInstanceUID] },
    ]);
    viewportGridService.setActiveViewportId(left);
    // Each viewport to its own image: the query's stays, the hit's is shown (a viewport given a
    // series it already shows keeps its slice, so the slice is set here, not as an option).
    await Promise.all([this.showImage(left, this.previous.queryImage), this.showImage(right, hit.SOPInstanceUID)]);
    this.drawRegion(right, hit);
    this.changed(hit);
  }

  /** Scrolls the viewport's stack to the image `sopInstanceUid`, until it stays there: a viewport
   * given a new series sets its stack asynchronously, at its first image, after the images are known. */
  async showImage(viewportId, sopInstanceUid) {
    if (!sopInstanceUid) return;
    const { cornerstoneViewportService } = this.services;
    let steady = 0;
    await until(() => {
      const viewport = cornerstoneViewportService.getCornerstoneViewport(viewportId);
      const index = viewport?.getImageIds?.().findIndex(imageId => imageId.includes(sopInstanceUid)) ?? -1;
      if (index < 0) return false;
      if (viewport.getCurrentImageIdIndex() !== index) {
        steady = 0;
        viewport.setImageIdIndex(index);
        return false;
      }
      steady += 1;
      return steady >= 4; // 200 ms at the image: the stack has settled
    });
  }

  /** The hit's matching region as a rectangle over its viewport (image pixels to canvas). */
  drawRegion(viewportId, hit) {
    this.removeRegion();
    if (!hit.region) {
      return;
    }
    const { cornerstoneViewportService } = this.services;
    const place = async () => {
      const viewport = await until(() => {
        const candidate = cornerstoneViewportService.getCornerstoneViewport(viewportId);
        return candidate?.getCurrentImageId?.()?.includes(hit.SOPInstanceUID) ? candidate : null;
      });
      const element = viewport.element;
      const box = document.createElement('div');
      box.dataset.cbirRegion = hit.SOPInstanceUID;
      Object.assign(box.style, {
        position: 'absolute', border: `2px solid ${REGION_COLOUR}`, pointerEvents: 'none', zIndex: 10,
      });
      const [x0, y0, x1, y1] = hit.region.box;
      const reposition = () => {
        const imageData = viewport.getImageData?.();
        if (!imageData) return;
        const world = (x, y) => imageData.imageData.indexToWorld([x, y, 0]);
        const [ax, ay] = viewport.worldToCanvas(world(x0, y0));
        const [bx, by] = viewport.worldToCanvas(world(x1, y1));
        Object.assign(box.style, {
          left: `${Math.min(ax, bx)}px`, top: `${Math.min(ay, by)}px`,
          width: `${Math.abs(bx - ax)}px`, height: `${Math.abs(by - ay)}px`,
        });
      };
      element.appendChild(box);
      reposition();
      element.addEventListener('CORNERSTONE_CAMERA_MODIFIED', reposition);
      this.overlay = () => {
        element.removeEventListener('CORNERSTONE_CAMERA_MODIFIED', reposition);
        box.remove();
      };
    };
    place().catch(() => this.removeRegion());
  }

  removeRegion() {
    this.overlay?.();
    this.overlay = null;
  }

  /** Back to the layout before the comparison, the query's series in the first viewport. */
  close() {
    if (!this.previous) {
      return;
    }
    const { numRows, numCols, queryImage } = this.previous;
    const { viewportGridService } = this.services;
    this.previous = null;
    this.removeRegion();
    document.removeEventListener('keydown', this.onKey);
    // the query's viewport (the first) stays as it is; the layout goes back around it
    this.commandsManager.runCommand('setViewportGridLayout', { numRows, numCols });
    until(() => {
      const grid = viewportGridService.getState();
      return grid.layout.numRows === numRows && grid.layout.numCols === numCols;
    })
      .then(() => {
        const [first] = orderedViewportIds(viewportGridService.getState());
        viewportGridService.setActiveViewportId(first);
        return this.showImage(first, queryImage);
      })
      .catch(() => {});
    this.changed(null);
  }
}
