// The orthanc-cbir extension of OHIF v3: a "Similar" panel (`orthanc-cbir.panelModule.similar`)
// and the commands `cbirShowBeside` / `cbirCloseBeside`. Loaded at run time: list this file's
// URL in `window.config.extensions` (see the README), no rebuild of OHIF.

import React from 'react';

import { CbirClient, cbirRoot } from './cbir.js';
import { Comparison } from './compare.js';
import SimilarPanel from './SimilarPanel.js';

export const EXTENSION_ID = 'orthanc-cbir';

let shared = null; // {client, comparison, defaultStrategy}: one per viewer page

const extension = {
  id: EXTENSION_ID,

  preRegistration({ servicesManager, commandsManager, appConfig }) {
    const services = servicesManager.services;
    shared = {
      services,
      commandsManager,
      client: new CbirClient(cbirRoot(appConfig), services),
      comparison: new Comparison(services, commandsManager),
      defaultStrategy: appConfig?.orthancCbir?.defaultStrategy,
    };
  },

  getPanelModule() {
    return [
      {
        name: 'similar',
        iconName: 'tool-magnify',
        iconLabel: 'Similar',
        label: 'Similar',
        component: () => React.createElement(SimilarPanel, shared),
      },
    ];
  },

  getCommandsModule() {
    return {
      definitions: {
        cbirShowBeside: { commandFn: ({ hit }) => shared.comparison.show(hit) },
        cbirCloseBeside: { commandFn: () => shared.comparison.close() },
      },
      defaultContext: 'VIEWER',
    };
  },
};

export default extension;
