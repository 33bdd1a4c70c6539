// The orthanc-cbir mode: OHIF's stack viewer with the study's series on the left and the
// "Similar" panel open on the right. Loaded at run time from `window.config.modes`.

const ohif = {
  layout: '@ohif/extension-default.layoutTemplateModule.viewerLayout',
  sopClassHandler: '@ohif/extension-default.sopClassHandlerModule.stack',
  thumbnailList: '@ohif/extension-default.panelModule.seriesList',
};
const cornerstone = {
  viewport: '@ohif/extension-cornerstone.viewportModule.cornerstone',
  measurements: '@ohif/extension-cornerstone.panelModule.panelMeasurement',
};
const similarPanel = 'orthanc-cbir.panelModule.similar';
const TOOLBAR_SECTIONS = {
  primary: ['MeasurementTools', 'Zoom', 'Pan', 'WindowLevel', 'Layout'],
  MeasurementTools: ['RectangleROI', 'Length'],
};

// Tools of the one tool group: the basic mode's mouse bindings, and the rectangle that
// draws a region query.
function initToolGroup(extensionManager, toolGroupService) {
  const { toolNames, Enums } = extensionManager.getModuleEntry(
    '@ohif/extension-cornerstone.utilityModule.tools'
  ).exports;
  toolGroupService.createToolGroupAndAddTools('default', {
    active: [
      { toolName: toolNames.WindowLevel, bindings: [{ mouseButton: Enums.MouseBindings.Primary }] },
      { toolName: toolNames.Pan, bindings: [{ mouseButton: Enums.MouseBindings.Auxiliary }] },
      { toolName: toolNames.Zoom, bindings: [{ mouseButton: Enums.MouseBindings.Secondary }] },
      { toolName: toolNames.StackScroll, bindings: [{ mouseButton: Enums.MouseBindings.Wheel }] },
    ],
    passive: [{ toolName: toolNames.RectangleROI }, { toolName: toolNames.Length }],
    enabled: [],
    disabled: [{ toolName: toolNames.ReferenceLines }],
  });
}

function modeFactory() {
  return {
    id: 'orthanc-cbir',
    routeName: 'similar',
    displayName: 'Find similar (orthanc-cbir)',
    onModeEnter({ servicesManager, extensionManager }) {
      const { measurementService, toolGroupService, toolbarService, customizationService } = servicesManager.services;
      measurementService.clearMeasurements();
      initToolGroup(extensionManager, toolGroupService);
      // Only the buttons the toolbar shows: the others' evaluators live in extensions not loaded here.
      const shown = new Set(Object.values(TOOLBAR_SECTIONS).flat());
      const buttons = [].concat(customizationService.getCustomization('toolbarButtons') ?? []);
      toolbarService.register(buttons.filter(button => shown.has(button.id)));
      for (const [key, section] of Object.entries(TOOLBAR_SECTIONS)) {
        toolbarService.updateSection(key, section);
      }
    },
    onModeExit({ servicesManager }) {
      const { toolGroupService, cornerstoneViewportService, uiDialogService, uiModalService } = servicesManager.services;
      uiDialogService.hideAll();
      uiModalService.hide();
      toolGroupService.destroy();
      cornerstoneViewportService.destroy();
    },
    validationTags: { study: [], series: [] },
    isValidMode: ({ modalities }) => ({
      valid: modalities.split('\\').some(modality => !['SM', 'SR', 'SEG', 'RTSTRUCT', 'KO', 'PR', 'ECG'].includes(modality)),
      description: 'Needs images (not only reports, segmentations or waveforms)',
    }),
    toolbarButtons: [{ $reference: 'cornerstone.toolbarButtons' }],
    routes: [
      {
        path: 'similar',
        layoutTemplate: () => ({
          id: ohif.layout,
          props: {
            leftPanels: [ohif.thumbnailList],
            rightPanels: [similarPanel, cornerstone.measurements],
            rightPanelClosed: false,
            viewports: [{ namespace: cornerstone.viewport, displaySetsToDisplay: [ohif.sopClassHandler] }],
          },
        }),
      },
    ],
    extensions: extensionDependencies,
    hangingProtocol: 'default',
    sopClassHandlers: [ohif.sopClassHandler],
  };
}

// OHIF imports a mode's dependencies by these names: ours is the extension beside this file,
// so a site that lists only the mode's URL gets the extension too.
const extensionDependencies = {
  '@ohif/extension-default': '^3.0.0',
  '@ohif/extension-cornerstone': '^3.0.0',
  [new URL('./extension.js', import.meta.url).href]: '^0.1.0',
};

export default { id: 'orthanc-cbir', modeFactory, extensionDependencies };
